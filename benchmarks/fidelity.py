"""Fidelity table: Pearson R of every estimator against the exact Shapley values of the true one-step
game (all 2^|B| subsets, the real torch optimizer), float64, on the test cases.

    python benchmarks/fidelity.py            # prints the markdown tables of docs/method.md
"""
import argparse
import os
import sys

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from shardshap.testing import cases  # noqa: E402
from shardshap.verify import compare_estimators  # noqa: E402

CASES = {"MLP / digits (B=10)": lambda: cases.digits_mlp(batch_size=10),
         "GPT-2 tiny (B=8)": lambda: cases.tiny_gpt2(batch_size=8),
         "Llama tiny (B=8)": lambda: cases.tiny_llama(batch_size=8)}
VARIANTS = [dict(estimator="secant", order=2), dict(estimator="secant", order=2, cold_start="none"),
            dict(estimator="secant", order=2, schedule="streaming"),
            dict(estimator="secant", order=2, curvature="hvp"),
            dict(estimator="secant", order=1), dict(estimator="adam-lagged", order=2),
            dict(estimator="adam-lagged", order=1), dict(estimator="sgd", order=2), dict(estimator="sgd", order=1)]


def run(make, opt_fn, steps):
    case = make()
    opt = opt_fn(case.model.parameters())
    rows = {}
    for s in range(max(steps) + 1):
        b, ids = case.batches(s)
        if s + 1 in steps:
            _, res = compare_estimators(case.model, opt, case.train_loss, case.target_loss, b, ids, None,
                                        variants=VARIANTS)
            rows[s + 1] = res
        opt.zero_grad()
        case.train_loss(case.model, b).mean().backward()
        opt.step()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 11, 31])
    args = ap.parse_args()
    torch.set_num_threads(2)
    optimizers = {"AdamW lr 3e-3, betas (0.9, 0.95), wd 0.1":
                  lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
                  "SGD lr 0.02, momentum 0.9, wd 1e-3":
                  lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=1e-3)}
    for oname, ofn in optimizers.items():
        for cname, make in CASES.items():
            if oname.startswith("SGD") and not cname.startswith("MLP"):
                continue
            rows = run(make, ofn, args.steps)
            names = [r.name for r in next(iter(rows.values()))]
            print(f"\n### {cname}, {oname}\n")
            print("| step | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for step, res in rows.items():
                cells = [f"{min(r.pearson):.4f} ({max(r.efficiency_gap):.1%})" for r in res]
                print(f"| {step} | " + " | ".join(cells) + " |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
