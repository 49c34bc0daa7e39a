"""torch.compile'd models under attribution: step time of plain and attributed steps, eager and compiled, on W1
(GPT-2 4 layers d=256, T=128, batch 32, after 12 plain steps; benchmarks/throughput.py), one step of each per
round, interleaved; and what dynamo did (graphs, graph breaks) over the two compiled models.

    python benchmarks/compiled.py [--rounds 10 --warmup 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch._dynamo
from throughput import Runner, interleave, make_workload, warm

import shardshap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each configuration each)")
    ap.add_argument("--warmup", type=int, default=3, help="first rounds left out (compilation happens there)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # two compiled instances of one model class: without hook guards dynamo would give the attributed one the
    # plain one's graphs, compiled without shardshap's hooks (the Attributor refuses such a step)
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    wl = make_workload("w1", "cpu", target_batch=2)
    warm(wl, 12)  # past the cold steps (Owen's start), as benchmarks/throughput.py

    def compiled_copy():
        model, opt = copy.deepcopy((wl.model, wl.opt))
        return torch.compile(model), opt

    runners = {"plain eager": Runner(wl, None), "plain compiled": Runner(wl, None, *compiled_copy()),
               "attributed eager": Runner(wl, shardshap.Config()),
               "attributed compiled": Runner(wl, shardshap.Config(), *compiled_copy())}
    torch._dynamo.utils.counters.clear()
    times = interleave(wl, runners, args.rounds + args.warmup, args.warmup, first_step=12)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"W1 on CPU, {args.threads} threads, median of {args.rounds} rounds after {args.warmup} warm-up rounds\n")
    print("| configuration | step (ms) | / plain eager | / plain compiled |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {1e3 * v:.0f} | {v / med['plain eager']:.3f} | {v / med['plain compiled']:.3f} |")
    print(f"\nattributed compiled / attributed eager: {med['attributed compiled'] / med['attributed eager']:.3f}")
    c = torch._dynamo.utils.counters
    breaks = sum(c["graph_break"].values())
    print(f"dynamo over both compiled models: {c['stats']['unique_graphs']} graphs, {breaks} graph breaks, "
          f"frames {dict(c['frames'])}")
    for mode in ("eager", "compiled"):  # the same steps with and without attribution
        plain, attributed = runners[f"plain {mode}"].model, runners[f"attributed {mode}"].model
        with torch.no_grad():
            diff = max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(attributed.parameters(),
                                                                                   plain.parameters()))
        same = all(torch.equal(p, q) for p, q in zip(attributed.parameters(), plain.parameters()))
        print(f"parameters after {args.rounds + args.warmup} steps, attributed vs plain {mode}: "
              f"{'bit-identical' if same else f'max relative difference {diff:.1e}'}")
    a = runners["attributed compiled"].attr
    print(f"attributed parameter names: {list(a.plan.params)[:3]} ...")
    for r in runners.values():
        r.close()


if __name__ == "__main__":
    main()
