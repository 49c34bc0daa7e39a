"""Presets near initialisation: Pearson R of each preset's per-sample values against exact mode, at every step
from a freshly initialised model (Adam's cold steps included), on small GPT-2s.

Every step is valued by each configuration on deep copies of the same model and optimizer state; the state then
advances by a plain step (AdamW with clipping). Batch 12 sequences, one target sequence (rho 1/12).

    python benchmarks/preset_fidelity.py                  # 4 models x 14 steps, presets fast and lowrank (~4 min)
    python benchmarks/preset_fidelity.py --steps 4 --presets fast
    python benchmarks/preset_fidelity.py --batched        # the accelerator path (stacked layers, foreach math)
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
import shardshap.foreach  # noqa: E402

MODELS = {  # name: (layers, d_model, vocab, lr)
    "3 x 192, lr 1e-3": (3, 192, 2048, 1e-3),
    "3 x 192, lr 3e-4": (3, 192, 2048, 3e-4),
    "2 x 64, lr 1e-3": (2, 64, 512, 1e-3),
    "4 x 128, lr 6e-4": (4, 128, 4096, 6e-4),
}
T, BATCH = 64, 12


def seq_losses(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def target_loss(model, targets):
    return seq_losses(model, targets).mean()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def run(layers: int, d: int, vocab: int, lr: float, seed: int, steps: int, presets: list[str]) -> list[dict]:
    """Per step: preset -> R against exact."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=T, n_embd=d, n_layer=layers, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (steps * BATCH, T), generator=g)
    targets = torch.randint(0, vocab, (1, T), generator=g)
    rows = []
    for s in range(steps):
        x, ids = data[s * BATCH:(s + 1) * BATCH], torch.arange(s * BATCH, (s + 1) * BATCH)
        values = {}
        for name in ["exact", *presets]:
            m, o = copy.deepcopy((model, opt))
            with shardshap.Attributor(m, o, seq_losses, target_loss,
                                      shardshap.Config(max_grad_norm=1.0, preset=name)) as attr:
                values[name] = attr.step(x, ids, targets).scores
        rows.append({name: pearson(values["exact"], values[name]) for name in presets})
        opt.zero_grad()
        seq_losses(model, x).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=14,
                    help="steps from initialisation (the first Config.cold_steps = 10 are Adam's cold steps)")
    ap.add_argument("--presets", default="fast,lowrank", help="comma-separated presets to compare with exact")
    ap.add_argument("--batched", action="store_true",
                    help="take the accelerator path on this CPU (shardshap.foreach.BATCH_KERNELS: layers stacked, "
                         "foreach math, and preset 'fast' without the target pass's bf16 autocast)")
    args = ap.parse_args()
    shardshap.foreach.BATCH_KERNELS = True if args.batched else None
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="bf16 attribution math")  # (emulated bf16: slow, same values)
    presets = args.presets.split(",")
    cold = shardshap.Config().cold_steps
    print(f"torch {torch.__version__}, shardshap {shardshap.__version__}; R against exact at steps 0..{args.steps - 1} "
          f"(0..{cold - 1} cold: Owen's cold start); {'accelerator' if args.batched else 'CPU'} path")
    print("| model | preset | min R | R per step |")
    print("|---|---|---|---|")
    for seed, (name, spec) in enumerate(MODELS.items()):
        rows = run(*spec, seed=seed, steps=args.steps, presets=presets)
        for p in presets:
            per_step = [r[p] for r in rows]
            print(f"| {name} | {p} | {min(per_step):.5f} | {' '.join(f'{v:.5f}' for v in per_step)} |", flush=True)


if __name__ == "__main__":
    main()
