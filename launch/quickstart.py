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
import random
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import shardshap

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


def auroc(score: np.ndarray, is_positive: np.ndarray) -> float:
    """AUROC of 'a low score flags a positive': P(score of a random positive < score of a random negative)."""
    pos = is_positive.astype(bool)
    ranks = score.argsort().argsort() + 1.0  # ascending ranks (ties are rare for float values)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    pos_above_neg = ranks[pos].sum() - n_pos * (n_pos + 1) / 2  # Mann-Whitney U
    return float(1.0 - pos_above_neg / (n_pos * n_neg))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--per-domain", type=int, default=400, help="training samples per domain")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    code, prose, junk = build_corpus(args.per_domain, args.seed)
    n = args.per_domain
    train_texts = code[:n] + prose[:n] + junk[:n]
    domains = np.array(["code"] * n + ["prose"] * n + ["junk"] * n)
    tokens = [encode(t) for t in train_texts]
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

    attr = shardshap.Attributor(model, opt, per_sample_loss, target_loss,
                                shardshap.Config(max_grad_norm=1.0, target_names=["code", "prose"]))
    N = len(train_texts)
    value = np.zeros((N, 2))
    count = np.zeros(N, dtype=int)
    first_loss = np.full(N, np.nan)
    order = np.random.default_rng(args.seed).permutation(np.tile(np.arange(N), args.steps * args.batch // N + 1))
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="training with attribution", unit="step")
    for step in bar:
        ids = torch.as_tensor(order[step * args.batch:(step + 1) * args.batch])
        batch = tuple(x.to(dev) for x in to_batch([tokens[i] for i in ids]))
        out = attr.step(batch, ids, None)
        sched.step()
        idx = ids.numpy()
        np.add.at(value, idx, out.scores.double().cpu().numpy())
        np.add.at(count, idx, 1)
        fresh = np.isnan(first_loss[idx])
        first_loss[idx[fresh]] = out.sample_loss.cpu().numpy()[fresh]
        bar.set_postfix(loss=f"{out.loss.item():.3f}", code=f"{out.target_loss[0].item():.3f}",
                        prose=f"{out.target_loss[1].item():.3f}")
    attr.close()
    seen = count > 0
    total = value.sum(1)
    print(f"\n{args.steps} steps in {time.time() - t0:.0f} s; {seen.sum()} of {N} samples seen")
    print(f"{'domain':<8}{'samples':>8}{'mean value (code)':>20}{'mean value (prose)':>20}{'negative share':>16}")
    for d in ("code", "prose", "junk"):
        sel = seen & (domains == d)
        print(f"{d:<8}{sel.sum():>8}{value[sel, 0].mean():>20.3e}{value[sel, 1].mean():>20.3e}"
              f"{(total[sel] < 0).mean():>16.1%}")
    is_junk = domains[seen] == "junk"
    print(f"AUROC of 'low value => junk' (sum over targets): {auroc(total[seen], is_junk):.3f}")
    print(f"AUROC of 'high training loss => junk':            {auroc(-first_loss[seen], is_junk):.3f}")
    print("In-Run values measure each sample's contribution to the target losses in this run; they are not a "
          "dedicated noise detector.")


if __name__ == "__main__":
    main()
