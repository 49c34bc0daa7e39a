"""Filter and retrain (paper A's experiment, demo scale).

1. Train the demo config once with attribution (or reuse a store: --store, with the corpus it was trained on:
   --data), 2. `shardshap select --rule drop-negative` (per --target, or the sum over targets) writes the
   keep list, 3. retrain from scratch twice with the same seed and step budget, attribution off:
   (a) all data, (b) `data.keep` = the kept ids, each evaluating the validation targets every
   --eval-every steps (`train.eval_every`).
Prints, per validation target, the steps each retrain needs to reach a fixed loss (run (a)'s loss at
--threshold-at of the budget) and the final losses, side by side, and how many samples were dropped per domain.

    python benchmarks/filter_retrain.py        # the demo config, 2 ranks (DeepSpeed ZeRO-2), ~3-4 min on 2 cores
    python benchmarks/filter_retrain.py --store runs/quickstart/run.zarr --data runs/quickstart/data
    python benchmarks/filter_retrain.py --steps 200 --seed 1 --rule drop-negative --target code --nproc 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))


def train(args, out: Path, data: Path, sets: list[str], log: Path) -> dict:
    """One run of launch/train.py (torchrun with --nproc ranks, or one process); returns its summary."""
    overrides = [f"out_dir={out}", f"train.seed={args.seed}", f"data.corpus=[{data / 'train.jsonl'}]",
                 f"data.validation.code={data / 'val_code.jsonl'}", f"data.validation.prose={data / 'val_prose.jsonl'}",
                 "train.log_every=50", *args.set, *sets]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", args.config]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               str(ROOT / "launch" / "train.py"), "--config", args.config]
    else:
        overrides += ["distributed.engine=none", "distributed.deepspeed=null",
                      f"train.grad_accum={args.grad_accum_1proc}"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               TRANSFORMERS_VERBOSITY="error")
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"filter_retrain: training failed (exit {proc.returncode}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = round(time.time() - t0, 1)
    print(f"  {out.name}: {summary['steps']} steps, pool {summary['pool']}, {summary['wall_seconds']} s", flush=True)
    return summary


def steps_to(evals: list[dict], target: str, threshold: float):
    """First evaluated step whose loss is <= threshold (None: never within the budget)."""
    return next((e["step"] for e in evals if e[target] <= threshold), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo_cpu.yaml")
    ap.add_argument("--out", default="runs/filter_retrain", help="work folder (corpus, stores, keep list, logs)")
    ap.add_argument("--store", help="reuse this store instead of the attribution run (give its corpus with --data)")
    ap.add_argument("--data", help="demo corpus folder (train.jsonl, val_code.jsonl, val_prose.jsonl); default: "
                                   "build it in OUT/data with launch/demo_corpus.py defaults")
    ap.add_argument("--steps", type=int, help="step budget of every run (default: the config's train.steps)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    ap.add_argument("--rule", default="drop-negative", choices=["drop-negative", "drop-lowest"])
    ap.add_argument("--fraction", type=float, default=0.1, help="for drop-lowest")
    ap.add_argument("--target", help="select on this target's values (default: the sum over targets)")
    ap.add_argument("--threshold-at", type=float, default=0.6,
                    help="threshold = run (a)'s validation loss at this fraction of the budget")
    ap.add_argument("--eval-every", type=int, default=5, help="validation loss every N steps in the retrains")
    ap.add_argument("--nproc", type=int, default=2,
                    help="ranks (torchrun, the config's engine); 1: one process, engine none")
    ap.add_argument("--grad-accum-1proc", type=int, default=4,
                    help="with --nproc 1: micro-batches per step (4 keeps the demo's global batch of 32)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    args = ap.parse_args()
    os.chdir(ROOT)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    import numpy as np

    from shardshap.analysis.manifest import default_path, read_manifest

    if args.data:
        data = Path(args.data).resolve()
    else:
        from demo_corpus import write_demo_corpus
        data = out / "data"
        write_demo_corpus(str(data))
    print(f"filter_retrain: corpus {data}, config {args.config}, seed {args.seed}, {args.nproc} rank(s)", flush=True)

    # 1. attribution run (or a given store)
    if args.store:
        store = Path(args.store).resolve()
    else:
        train(args, out / "attributed", data, ["attribution.enabled=true", "attribution.overwrite=true"],
              out / "attributed.log")
        store = out / "attributed" / "run.zarr"

    # 2. selection: `shardshap select`
    keep_path = out / "keep.txt"
    cmd = [sys.executable, "-m", "shardshap.cli", "select", str(store), "--rule", args.rule, "-o", str(keep_path),
           "--json"]
    cmd += ["--fraction", str(args.fraction)] if args.rule == "drop-lowest" else []
    cmd += ["--target", args.target] if args.target else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"filter_retrain: shardshap select failed: {proc.stderr.strip()}")
    sel = json.loads(proc.stdout)
    print(f"  shardshap select: kept {sel['kept']}, dropped {sel['dropped']}", flush=True)
    keep = np.loadtxt(keep_path, dtype=np.int64, ndmin=1)
    manifest = read_manifest(default_path(str(store)), sel["kept"] + sel["dropped"])
    if manifest is None:
        raise SystemExit(f"filter_retrain: no manifest next to {store} (domains unknown)")
    domains = manifest.domain
    dropped = np.setdiff1d(np.arange(len(domains)), keep)
    names, totals = np.unique(domains, return_counts=True)
    per_domain = {d: (int((domains[dropped] == d).sum()), int(n)) for d, n in zip(names, totals)}

    # 3. the two retrains, attribution off
    plain = ["attribution.enabled=false", f"train.eval_every={args.eval_every}"]
    a = train(args, out / "retrain_all", data, plain, out / "retrain_all.log")
    b = train(args, out / "retrain_kept", data, plain + [f"data.keep={keep_path}"], out / "retrain_kept.log")

    budget = a["steps"]
    at = max(args.eval_every, int(round(args.threshold_at * budget / args.eval_every)) * args.eval_every)
    ref = next(e for e in a["eval"] if e["step"] == at)
    targets = [k for k in a["eval"][0] if k != "step"]
    rule = f"{args.rule}{f' --fraction {args.fraction}' if args.rule == 'drop-lowest' else ''}"
    print()
    print(f"filter and retrain: {args.config}, {budget} steps, seed {args.seed}, {args.nproc} rank(s); select "
          f"{rule} on {args.target or 'the sum over targets'} of {store}")
    print(f"kept {len(keep)} of {len(domains)} samples; dropped per domain: "
          + ", ".join(f"{d} {k} of {n}" for d, (k, n) in per_domain.items()))
    print(f"threshold: run (a)'s validation loss at step {at} ({args.threshold_at:.0%} of the budget); "
          f"validation loss every {args.eval_every} steps")
    head = ["target", "threshold", "steps to it (a) all", "(b) kept", "final loss (a) all", "(b) kept", "(b) - (a)"]
    rows = []
    for t in targets:
        sa, sb = steps_to(a["eval"], t, ref[t]), steps_to(b["eval"], t, ref[t])
        fa, fb = a["eval"][-1][t], b["eval"][-1][t]
        rows.append([t, f"{ref[t]:.4f}", str(sa), "not reached" if sb is None else str(sb),
                     f"{fa:.4f}", f"{fb:.4f}", f"{fb - fa:+.4f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print(f"wall time {time.time() - t_start:.0f} s on {platform.node() or 'this machine'} "
          f"({os.cpu_count()} CPUs); work folder {out}")
    result = {"config": args.config, "steps": budget, "seed": args.seed, "rule": rule, "target": args.target,
              "store": str(store), "kept": int(len(keep)), "dropped_per_domain": per_domain,
              "threshold_step": at, "threshold": {t: ref[t] for t in targets},
              "eval_all": a["eval"], "eval_kept": b["eval"],
              "steps_to_threshold": {t: [steps_to(a["eval"], t, ref[t]), steps_to(b["eval"], t, ref[t])]
                                     for t in targets}}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
