"""Micro-probes behind docs/benchmarks.md ("What changed this round"): one-off kernels timed in isolation.

    python benchmarks/micro.py gemm                  # fp32 vs bf16 GEMM at a W1 product shape
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/micro.py gemm    # the same without bf16 matrix units
    python benchmarks/micro.py factorize             # the low-rank sketch of 17 W1-shaped matrices
    python benchmarks/micro.py freeze [--compile]    # the Adam secant map of 1M parameters, eager (and compiled)
    python benchmarks/micro.py target [--workload w2]  # the target forward+backward, float32 vs bf16 autocast
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from shardshap.ghost.lowrank import factorize  # noqa: E402
from shardshap.optim.adam import AdamRule  # noqa: E402


def ms(fn, n=10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - t0) / n


def gemm():
    e, W = torch.randn(4096, 1024), torch.randn(1024, 256)  # W1's c_fc output gradients x its product matrix
    eb, Wb = e.bfloat16(), W.bfloat16()
    print(f"[4096 x 1024] @ [1024 x 256]: fp32 {ms(lambda: e @ W):.2f} ms, bf16 {ms(lambda: eb @ Wb):.2f} ms, "
          f"cast of e to bf16 {ms(lambda: e.bfloat16()):.2f} ms (ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL')}, AMX: {torch.cpu._is_amx_tile_supported()})")


def factorize_w1():
    g = torch.Generator().manual_seed(0)
    shapes = [(768, 256), (256, 256), (1024, 256), (256, 1024)] * 4 + [(4096, 256)]  # 4 blocks + LM head
    mats = [torch.randn(1, o, i, generator=g) @ torch.diag(torch.linspace(1, 0.01, i)) for o, i in shapes]
    for p in (0, 1):
        print(f"rank 16, power_iters {p}: {ms(lambda p=p: [factorize(W, 16, power_iters=p) for W in mats], 5):.1f} ms "
              "for the 17 matrices")


def freeze(compile_too: bool):
    n, rule = 1 << 20, AdamRule(decoupled_default=True)
    p, g = torch.nn.Parameter(torch.randn(n)), torch.randn(n) * 1e-3
    state = {"step": torch.tensor(20.0), "exp_avg": torch.randn(n) * 1e-3, "exp_avg_sq": torch.rand(n) * 1e-6}
    group = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}

    def secant(compiled):
        step = rule.step_map(p, g, group, state, g.dtype, compiled=compiled)
        return step.slope, step.midpoint(g)

    print(f"secant slope + midpoint of 1M parameters, eager: {ms(lambda: secant(False)):.2f} ms")
    if compile_too:  # the kernel Config.compile_math uses (the midpoint stays eager)
        t0 = time.perf_counter()
        secant(True)
        print(f"  compile_math: first call {time.perf_counter() - t0:.1f} s, then {ms(lambda: secant(True)):.2f} ms")


def target(workload: str):
    import statistics

    import throughput as tp
    tp.keep_freed_memory()
    wl = tp.make_workload(workload, "cpu", 2)
    params = list(wl.model.parameters())

    def grads(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = tp.target_loss(wl.model, wl.targets)
        return torch.autograd.grad(value, params)
    times = {False: [], True: []}
    for _ in range(6 if workload == "w1" else 3):
        for bf16 in (False, True):
            t0 = time.perf_counter()
            grads(bf16)
            times[bf16].append(time.perf_counter() - t0)
    g32, g16 = grads(False), grads(True)
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g32, g16))
    norms = [sum(x.double().square().sum() for x in g).sqrt() for g in (g32, g16)]
    f32 = 1e3 * statistics.median(times[False][1:])
    print(f"{workload} target forward+backward (2 sequences): float32 {f32:.0f} ms, "
          f"bf16 autocast {1e3 * statistics.median(times[True][1:]):.0f} ms; cosine of the target gradients "
          f"{(dot / (norms[0] * norms[1])).item():.6f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["gemm", "factorize", "freeze", "target"])
    ap.add_argument("--workload", default="w1", choices=["w1", "w2"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"gemm": gemm, "factorize": factorize_w1, "freeze": lambda: freeze(a.compile),
     "target": lambda: target(a.workload)}[a.probe]()
