"""Quickstart: value every training sample of a tiny GPT-2 while it trains (single process, CPU).

The corpus is built from files present on every Python installation: standard-library source code
(`code`), its docstrings (`prose`), and a generated `junk` domain (random bytes, shuffled characters,
repeated fragments). Targets: held-out code and held-out prose. At the end it prints, per domain, the
mean value and the share of negative values, and how well "low value" singles out junk (AUROC),
beside the same AUROC for the plain per-sample training loss.

    python launch/quickstart.py [--steps 300] [--device cuda]
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import shardshap
from shardshap import cli
from shardshap.analysis.manifest import default_path as default_manifest_path, write_manifest

T = 64
PAD = 256


def build_corpus(per_domain: int, seed: int = 0):
    """[(domain, text)]: code and prose from the stdlib, junk generated."""
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    code, prose = [], []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) else None
            if doc and len(doc) >= 48:
                prose.append(doc)
        lines = [ln for ln in src.splitlines() if ln.strip() and not ln.strip().startswith(("#", '"', "'"))]
        for i in range(0, len(lines) - 4, 6):
            code.append("\n".join(lines[i:i + 4]))
    rng.shuffle(code)
    rng.shuffle(prose)
    alphabet = [chr(c) for c in range(33, 127)]
    junk = []
    for j in range(per_domain):
        kind = j % 3
        if kind == 0:
            junk.append("".join(rng.choice(alphabet) for _ in range(T)))
        elif kind == 1:
            s = list(rng.choice(prose)[:T])
            rng.shuffle(s)
            junk.append("".join(s))
        else:
            junk.append((rng.choice(["xq", "zz9 ", "#@!", "qwe rty "]) * T)[:T])
    return code, prose, junk


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace")[:T])


def to_batch(token_lists):
    ids = torch.full((len(token_lists), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(token_lists), T), dtype=torch.long)
    for r, toks in enumerate(token_lists):
        ids[r, :len(toks)] = torch.tensor(toks)
        mask[r, :len(toks)] = 1
    return ids, mask


def per_sample_loss(model, batch):
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1)
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1).clamp(min=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--per-domain", type=int, default=400, help="training samples per domain")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/quickstart", help="folder for the store, manifest and plots")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    code, prose, junk = build_corpus(args.per_domain, args.seed)
    n = args.per_domain
    train_texts = code[:n] + prose[:n] + junk[:n]
    domains = np.array(["code"] * n + ["prose"] * n + ["junk"] * n)
    tokens = [encode(t) for t in train_texts]
    train_texts = [t[:160] for t in train_texts]
    val = {"code": to_batch([encode(t) for t in code[n:n + 8]]),
           "prose": to_batch([encode(t) for t in prose[n:n + 8]])}
    dev = torch.device(args.device)
    val = {k: tuple(x.to(dev) for x in v) for k, v in val.items()}

    cfg = GPT2Config(vocab_size=PAD + 1, n_positions=T, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=PAD, eos_token_id=PAD)
    model = GPT2LMHeadModel(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps))))

    def target_loss(m, _):
        return torch.stack([per_sample_loss(m, val[k]).mean() for k in ("code", "prose")])

    N = len(train_texts)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "run.zarr")
    write_manifest(default_manifest_path(store), range(N), domains, train_texts)
    attr = shardshap.Attributor(
        model, opt, per_sample_loss, target_loss,
        shardshap.Config(max_grad_norm=1.0, target_names=["code", "prose"], num_samples=N),
        store=store, overwrite=True)
    order = np.random.default_rng(args.seed).permutation(np.tile(np.arange(N), args.steps * args.batch // N + 1))
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="training with attribution", unit="step")
    for step in bar:
        ids = torch.as_tensor(order[step * args.batch:(step + 1) * args.batch])
        # a sample drawn twice in one step would be two players with one id: keep the first draw
        ids = ids[np.sort(np.unique(ids.numpy(), return_index=True)[1])]
        batch = tuple(x.to(dev) for x in to_batch([tokens[i] for i in ids]))
        out = attr.step(batch, ids, None)
        sched.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}", code=f"{out.target_loss[0].item():.3f}",
                        prose=f"{out.target_loss[1].item():.3f}")
    attr.close()
    print(f"\n{args.steps} steps in {time.time() - t0:.0f} s; store: {store}\n")
    cli.main(["report", store])
    cli.main(["plot", store, "-o", os.path.join(args.out, "plots")])


if __name__ == "__main__":
    main()
