"""How exact are per-document values in packed sequences? The demo corpus packed into 64-token sequences
(the quickstart's model, float64, trained a few plain AdamW steps first), per-document values of one SGD step
(`estimator="sgd", order=1`: lr <g_D, grad L_target>) against explicit per-document gradients (one autograd
pass per document), with document-masked attention (exact) and with causal attention across the documents of
a sequence (the split by token is an approximation there).

    python benchmarks/packed_documents.py [--batches 6 --batch 8 --warm 30]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch

import shardshap
from shardshap.recipe.config import load_config
from shardshap.recipe.data import Sampler, build_data
from shardshap.recipe.model import build_model, position_losses, target_losses

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


def demo_corpus(out: str) -> dict:
    spec = importlib.util.spec_from_file_location("demo_corpus", ROOT / "launch" / "demo_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_demo_corpus(out)


def explicit(model, batch, ids, targets):
    """[documents, K] lr <g_D, grad L_target_k>, documents in increasing id order."""
    params = [p for p in model.parameters() if p.requires_grad]
    K = len(targets)
    h = [torch.autograd.grad(target_losses(model, targets)[k], params) for k in range(K)]
    n = int((ids >= 0).sum())
    rows = []
    for d in torch.unique(ids[ids >= 0]):
        g = torch.autograd.grad(position_losses(model, batch)[ids == d].sum() / n, params)
        rows.append([LR * sum((gi * hi).sum() for gi, hi in zip(g, hk)).item() for hk in h])
    return np.array(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=6, help="packed batches measured per attention")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch")
    ap.add_argument("--warm", type=int, default=30, help="plain AdamW steps before measuring")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_corpus(tmp)
        overrides = ["distributed={engine: none}", "data.packing=pack", "data.truncate=false",
                     f"data.corpus=[{paths['train']}]",
                     f"data.validation={{code: {paths['val_code']}, prose: {paths['val_prose']}}}"]
        print(f"{'attention':>9} | docs/batch | windows crossing a boundary | min R | median R | rel. error | "
              "sum gap")
        for attention in ("document", "causal"):
            cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", overrides + [f"data.attention={attention}"])
            data = build_data(cfg)
            torch.manual_seed(0)
            model = build_model(cfg, data.tokenizer.vocab_size, data.tokenizer.pad_id).double().train()
            dt = torch.float64
            targets = {k: v.batch(np.arange(len(v)), "cpu", attention, dt) for k, v in data.val.items()}
            sampler = Sampler(data.pool, args.batch, 1, 1, cfg.train.seed)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
            for s in range(args.warm):  # (the mean over counted positions, as the trainer's step)
                seqs = sampler.global_ids(s)
                ids = data.train.position_ids_of(seqs)
                opt.zero_grad()
                per = position_losses(model, data.train.batch(seqs, "cpu", attention, dt))
                (torch.where(ids >= 0, per, 0).sum() / (ids >= 0).sum()).backward()
                opt.step()
            Rs, errs, gaps, docs, crossing = [], [], [], [], []
            for s in range(args.warm, args.warm + args.batches):
                seqs = sampler.global_ids(s)
                batch, ids = data.train.batch(seqs, "cpu", attention, dt), data.train.position_ids_of(seqs)
                crossing.append(float(np.mean([len(np.unique(r[r >= 0])) > 1 for r in ids.numpy()])))
                ref = explicit(model, batch, ids, targets)
                m2 = copy.deepcopy(model)
                with shardshap.Attributor(m2, torch.optim.SGD(m2.parameters(), lr=LR), position_losses,
                                          target_losses, shardshap.Config(estimator="sgd", order=1)) as attr:
                    got = attr.step(batch, ids, targets).scores.numpy()
                docs.append(len(ref))
                Rs += [np.corrcoef(got[:, k], ref[:, k])[0, 1] for k in range(ref.shape[1])]
                errs.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                gaps.append(np.abs(got.sum(0) - ref.sum(0)).max() / np.abs(ref.sum(0)).max())
            print(f"{attention:>9} | {np.mean(docs):10.1f} | {np.mean(crossing):27.0%} | {min(Rs):.5f} | "
                  f"{np.median(Rs):8.5f} | {np.mean(errs):10.2e} | {max(gaps):.1e}")


if __name__ == "__main__":
    main()
