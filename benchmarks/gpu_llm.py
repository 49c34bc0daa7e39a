"""Plain vs attributed steps of GPT-2 small and a Llama of about 370M parameters under bf16 autocast (T 1024,
batch 16, rho = target tokens / training tokens = 1/16, K = 1 and 2 targets): step time, tokens/s, peak device
memory, and Pearson R of each configuration's values against exact mode's on the same steps. Every
configuration trains its own copy in lockstep (attribution does not change training), one step of each per
round, interleaved. `--tiny` shrinks the models and T for a CPU run of the same pipeline.

    python benchmarks/gpu_llm.py                     # on a GPU (benchmarks/gpu.sh runs it)
    python benchmarks/gpu_llm.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import shardshap

CONFIGS = {"exact": dict(), "preset fast": dict(preset="fast"), "streaming": dict(schedule="streaming")}


def model_of(name: str, tiny: bool, T: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    if name == "gpt2-small":
        sizes = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=512) if tiny else \
            dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
        return GPT2LMHeadModel(GPT2Config(n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **sizes))
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=512) if tiny else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=T, tie_word_embeddings=False, **sizes))


def losses(model, ids):
    """Per-sequence mean next-token loss (fp32 cross entropy)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1).mean(1)


def target_loss(model, targets):
    return torch.stack([losses(model, t).mean() for t in targets])


def tokens(vocab: int, n: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, T), generator=g)
    x[:, 1::2] = (x[:, 0::2] * 7 + 3) % vocab  # something to learn
    return x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name, K, args, device) -> list[dict]:
    T, b = (64, 16) if args.tiny else (1024, 16)
    torch.manual_seed(0)
    base = model_of(name, args.tiny, T).to(device).train()
    vocab = base.config.vocab_size
    data = tokens(vocab, b * (args.rounds + args.warmup + 1), T, 0).to(device)
    # rho 1/16: K targets of T/K tokens each, b*T/16 tokens in all (b = 16: one sequence's worth)
    held = tokens(vocab, K, b * T // 16 // K, 1).to(device)
    targets = [held[k:k + 1] for k in range(K)]
    runners = {}
    for cfg in ["plain", *CONFIGS]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        attr = None if cfg == "plain" else shardshap.Attributor(
            model, opt, losses, target_loss, shardshap.Config(cold_steps=0, max_grad_norm=1.0, **CONFIGS[cfg]))
        runners[cfg] = (model, opt, attr)
    del base
    times = {k: [] for k in runners}
    peak = {}
    R = {k: [] for k in CONFIGS if k != "exact"}
    for r in range(args.rounds + args.warmup):
        batch = data[r * b:(r + 1) * b]
        ids = torch.arange(r * b, (r + 1) * b)
        scores = {}
        for cfg, (model, opt, attr) in (runners.items() if r % 2 == 0 else reversed(runners.items())):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if attr is None:
                    opt.zero_grad(set_to_none=True)
                    losses(model, batch).mean().backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                else:
                    scores[cfg] = attr.step(batch, ids, targets).scores.double().cpu()
            sync(device)
            if r >= args.warmup:
                times[cfg].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[cfg] = max(peak.get(cfg, 0), torch.cuda.max_memory_allocated(device))
        if r >= args.warmup:
            for cfg in R:
                R[cfg] += [float(torch.corrcoef(torch.stack([scores[cfg][:, k], scores["exact"][:, k]]))[0, 1])
                           for k in range(K)]
    for _, _, attr in runners.values():
        if attr is not None:
            attr.close()
    plain = statistics.median(times["plain"])
    rows = []
    for cfg, t in times.items():
        med = statistics.median(t)
        rows.append({"workload": name, "K": K, "config": cfg, "ms": 1e3 * med, "ratio": med / plain,
                     "tokens_s": b * T / med, "peak_gib": peak.get(cfg, float("nan")) / 2 ** 30,
                     "R": min(R[cfg]) if cfg in R else (1.0 if cfg == "exact" else float("nan"))})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small models, T 64 (a CPU run of the same pipeline)")
    ap.add_argument("--workloads", nargs="+", default=["gpt2-small", "llama-370m"],
                    choices=["gpt2-small", "llama-370m"])
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 2], help="K values")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    device = torch.device(args.device)
    head = (f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
            f"bf16 autocast, {'tiny models, T 64' if args.tiny else 'T 1024'}, batch 16, rho 1/16, "
            f"median of {args.rounds} rounds after {args.warmup}")
    lines = [head, "", "| workload | K | configuration | ms / step | / plain | tokens/s | peak GiB | min R vs exact |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.workloads:
        for K in args.targets:
            for row in run(name, K, args, device):
                line = (f"| {row['workload']} | {row['K']} | {row['config']} | {row['ms']:.1f} | {row['ratio']:.3f} | "
                        f"{row['tokens_s']:.0f} | {row['peak_gib']:.2f} | {row['R']:.5f} |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
