"""Streaming schedule fidelity: Pearson R of `schedule="streaming"` values against the cached (exact) schedule's,
per stream_predictor, over windows of consecutive warm steps along a training run (float64, two targets,
two micro-batches of 8 per step, AdamW with clipping). Training is identical in every run (attribution never
changes it), so step t of each run is the same game.

    python benchmarks/streaming_fidelity.py            # the tables of docs/method.md ("Streaming")
    python benchmarks/streaming_fidelity.py --quick    # one window, one learning rate
    python benchmarks/streaming_fidelity.py --quick --cases "GPT-2 d=64" \
        --columns "subspace,subspace sketch_rank 32,momentum"
"""
import argparse
import functools
import os
import statistics

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
from shardshap.config import STREAM_PREDICTORS  # noqa: E402
from shardshap.testing import cases  # noqa: E402

CASES = {"GPT-2 tiny": cases.tiny_gpt2, "Llama tiny": cases.tiny_llama,
         # wider than the bases at the default sketch_rank (K * 16 = 32 < 64): the projection is exercised
         "GPT-2 d=64": functools.partial(cases.tiny_gpt2, n_embd=64, T=32, vocab=256)}
# column -> Config fields of the streamed run
COLUMNS = {**{p: {"stream_predictor": p} for p in STREAM_PREDICTORS},
           "subspace sketch_rank 32": {"stream_predictor": "subspace", "sketch_rank": 32}}


def values(make, lr, steps, **config):
    case = make(batch_size=8)
    opt = torch.optim.AdamW(case.model.parameters(), lr=lr, weight_decay=0.1)
    out = []
    cfg = shardshap.Config(max_grad_norm=1.0, cold_start="none", **config)
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, cfg) as attr:
        for t in range(steps):
            mbs = [case.batches(2 * t + j) for j in range(2)]
            out.append(attr.step([b for b, _ in mbs], [i for _, i in mbs], None).scores)
    return out


def pearson(a, b):
    return min(float(torch.corrcoef(torch.stack([a[:, k], b[:, k]]))[0, 1]) for k in range(a.shape[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--window", type=int, default=30, help="consecutive steps per window")
    ap.add_argument("--cases", type=lambda v: v.split(","), default=["GPT-2 tiny", "Llama tiny"],
                    help=f"comma-separated, of {list(CASES)}")
    ap.add_argument("--columns", type=lambda v: v.split(","), default=list(STREAM_PREDICTORS),
                    help=f"comma-separated, of {list(COLUMNS)}")
    args = ap.parse_args()
    torch.set_num_threads(2)
    starts = [10] if args.quick else [10, 100]
    lrs = [1e-3] if args.quick else [1e-3, 3e-4]
    steps = max(starts) + args.window
    print("| model | AdamW lr | steps | " + " | ".join(f"{c}: min R / median R" for c in args.columns) + " |")
    print("|---|---|---|" + "---|" * len(args.columns))
    for name in args.cases:
        make = CASES[name]
        for lr in lrs:
            exact = values(make, lr, steps)
            streamed = {c: values(make, lr, steps, schedule="streaming", **COLUMNS[c]) for c in args.columns}
            for s in starts:
                cells = []
                for c in args.columns:
                    R = [pearson(exact[t], streamed[c][t]) for t in range(s, s + args.window)]
                    cells.append(f"{min(R):.4f} / {statistics.median(R):.4f}")
                print(f"| {name} | {lr:g} | {s}-{s + args.window - 1} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
