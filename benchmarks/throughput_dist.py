"""Throughput under the distributed backends: attributed vs plain steps of W1 on 2 ranks (docs/benchmarks.md).

For each engine (DDP, FSDP2, DeepSpeed ZeRO-1/2/3) one `torchrun --nproc_per_node 2` job holds two copies of
W1 (benchmarks/throughput.py: GPT-2-like, 4 layers, d=256, T=128, global batch 32 = 16 per rank, target batch
2, AdamW), each wrapped by the engine: one trained plainly, one through `shardshap.Attributor`. Their steps
alternate (the order reversed every other round), with a barrier around each step so that a step's time is
that of the slowest rank; the first rounds are discarded and medians are reported, with the quartiles of
the per-round ratios and the bytes shardshap's own collectives sent per step (rank 0). `cold_steps=0`: the
timed steps use the warm secant (the cold-start estimator of the first Adam steps costs more).

    python benchmarks/throughput_dist.py                       # all engines, exact mode (~6 min on 2 CPU cores)
    python benchmarks/throughput_dist.py --engines ddp fsdp --preset fast
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import throughput as tp  # noqa: E402

import shardshap  # noqa: E402
from shardshap.backends import init_distributed, shutdown  # noqa: E402

ENGINES = ["ddp", "fsdp", "z1", "z2", "z3"]


def wrap(engine: str, model: torch.nn.Module, per_rank: int, opt_defaults: dict):
    """(module to call, torch optimizer or None, plain step) for one copy of the model under `engine`, with
    W1's AdamW settings (`opt_defaults`, the workload optimizer's defaults)."""
    if engine in ("ddp", "fsdp"):
        if engine == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in model.transformer.h:
                fully_shard(block)
            model = fully_shard(model)
        adamw = {k: opt_defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        opt = torch.optim.AdamW(model.parameters(), **adamw)

        def plain(x):
            opt.zero_grad()
            tp.train_loss(model, x).mean().backward()
            opt.step()
        return model, opt, plain
    import deepspeed
    zero = {"stage": int(engine[1])}
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, small ones too
    config = {"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {
                  "lr": opt_defaults["lr"], "betas": list(opt_defaults["betas"]), "eps": opt_defaults["eps"],
                  "weight_decay": opt_defaults["weight_decay"], "torch_adam": True}},
              "zero_optimization": zero, "steps_per_print": 10 ** 9}
    ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def plain(x):
        ds.backward(tp.train_loss(ds, x).mean())
        ds.step()
    return ds, None, plain


def worker(args) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    rank, world = init_distributed("gloo")
    if args.engine.startswith("z"):
        import deepspeed
        deepspeed.init_distributed("gloo")
    wl = tp.make_workload("w1", "cpu", 2)
    per_rank = 32 // world
    _, _, plain_step = wrap(args.engine, copy.deepcopy(wl.model), per_rank, wl.opt.defaults)
    model, opt, _ = wrap(args.engine, copy.deepcopy(wl.model), per_rank, wl.opt.defaults)
    attr = shardshap.Attributor(model, opt, tp.train_loss, tp.target_loss,
                                shardshap.Config(cold_steps=0, preset=args.preset))

    def local(step):
        x, ids = wl.batch(step)
        return x[rank * per_rank:(rank + 1) * per_rank], ids[rank * per_rank:(rank + 1) * per_rank]

    def attributed(x, ids):
        return attr.step(x, ids, wl.targets).metadata["bytes_sent"]

    times = {"plain": [], "attributed": []}
    sent = []
    for r in range(args.warmup + args.rounds):
        x, ids = local(r)
        order = ["plain", "attributed"] if r % 2 == 0 else ["attributed", "plain"]
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            out = plain_step(x) if name == "plain" else attributed(x, ids)
            dist.barrier()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                if name == "attributed":
                    sent.append(out)
    attr.close()
    if rank == 0:
        ratios = [a / p for a, p in zip(times["attributed"], times["plain"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print("RESULT " + json.dumps({
            "engine": args.engine, "backend": type(attr.backend).__name__,
            "plain_ms": 1e3 * statistics.median(times["plain"]),
            "attributed_ms": 1e3 * statistics.median(times["attributed"]),
            "ratio_q1": q[0], "ratio_q3": q[2], "mib_sent": statistics.median(sent) / 2 ** 20}), flush=True)
    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--preset", default=None, choices=[None, "exact", "fast", "lowrank"])
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each copy per round)")
    ap.add_argument("--warmup", type=int, default=2, help="rounds discarded")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="ddp", choices=ENGINES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(f"### W1 on 2 ranks (gloo, 1 thread each), preset {args.preset!r}, {args.rounds} rounds after "
          f"{args.warmup}\n")
    print("| engine | shardshap backend | plain ms / step | attributed ms / step | ratio | ratio quartiles | "
          "MiB sent by shardshap / step |")
    print("|---|---|---|---|---|---|---|")
    for engine in args.engines:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + ENGINES.index(engine)), os.path.abspath(__file__), "--worker", "--engine", engine,
               "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        if args.preset:
            cmd += ["--preset", args.preset]
        run = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            print(f"| {engine} | failed (exit {run.returncode}): {(run.stderr.strip().splitlines() or [''])[-1]} "
                  "| | | | | |", flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        print(f"| {engine} | {r['backend']} | {r['plain_ms']:.0f} | {r['attributed_ms']:.0f} | "
              f"**{r['attributed_ms'] / r['plain_ms']:.3f}** | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | "
              f"{r['mib_sent']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
