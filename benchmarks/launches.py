"""Kernel-launch proxy on CPU: aten ops dispatched by one optimizer step and device syncs, plain vs attributed.

On a GPU every op that is not a metadata-only view launches at least one kernel, so the op count of a step
predicts where a launch-bound GPU spends its time; a sync (`.item()`, `float(t)`, `.tolist()`) stalls the
host. A TorchDispatchMode counts every op of one warm step except views (`OpOverload.is_view`: view,
detach, slice, expand, transpose, ...), profiler markers and bare allocations (`empty*`), and counts as a
sync `aten._local_scalar_dense` (what every host read of a tensor value dispatches), except reads of the
optimizer's step counters (CPU scalars on a GPU too), and `tolist()` of floating-point tensors.
A foreach op counts once: on a GPU it launches one kernel per chunk of many tensors. Attribution takes
its accelerator path (`shardshap.foreach.BATCH_KERNELS = True`: foreach secant, same-shaped layers
stacked; `check_timing="next-step"`: the checks' verdicts read at the next step, without a sync).
Workload: HF GPT-2 (d 128, T 64, batch 8, one target, AdamW with clipping, `foreach=True` as on a GPU), at
two depths.

    python benchmarks/launches.py                  # 4 and 8 layers, plain / exact / fast / streaming
    python benchmarks/launches.py --layers 8 --configs exact,streaming
    python benchmarks/launches.py --autocast       # training under bf16 autocast (what preset='fast' is for)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
import shardshap.foreach  # noqa: E402

# check_timing='next-step' is the accelerators' default (a CPU's is 'before-step': one host read per step)
CONFIGS = {
    "exact": dict(check_timing="next-step"),
    "exact + before-step checks": dict(check_timing="before-step"),
    "fast": dict(preset="fast", check_timing="next-step"),
    "lowrank": dict(preset="lowrank", check_timing="next-step"),
    "streaming": dict(schedule="streaming", check_timing="next-step"),
    "streaming + fast": dict(schedule="streaming", preset="fast", check_timing="next-step"),
}
SYNC_OPS = {"_local_scalar_dense"}
# dispatched, but no kernel: profiler markers (no-ops without a profiler) and allocations without a fill
NO_KERNEL = {"_record_function_enter_new", "_record_function_exit", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "_unsafe_view"}  # (_unsafe_view: an alias, never a copy)


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops by name (views and NO_KERNEL excluded) and host syncs: every read of a
    tensor's value (`_local_scalar_dense`) but of the optimizer's step counters, and every `tolist()` of a
    floating-point tensor (tolist dispatches nothing on CPU; integer ids live on the host on a GPU too)."""

    def __init__(self, host_scalars=()):
        super().__init__()
        self.ops, self.syncs = Counter(), 0
        self.host_scalars = {id(t) for t in host_scalars}  # tensors that live on the host on a GPU too
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        counter, tolist = self, self._tolist

        def counted_tolist(t):
            counter.syncs += t.is_floating_point()
            return tolist(t)
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs += id(args[0]) not in self.host_scalars
        elif not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def workload(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=layers, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            foreach=True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 512, (64, 64), generator=g)
    targets = torch.randint(0, 512, (4, 64), generator=g)
    return model, opt, data, targets


AUTOCAST = False  # --autocast: the training (and target) forward under torch.autocast(bfloat16)


def seq_losses(model, ids):
    # (not autocast(enabled=False), which would turn off the bf16 autocast of Config.target_dtype)
    with torch.autocast(ids.device.type, torch.bfloat16) if AUTOCAST else contextlib.nullcontext():
        logits = model(input_ids=ids).logits[:, :-1]
        tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def batch(data, step):
    idx = (step * 8 + torch.arange(8)) % len(data)
    return data[idx], idx


def plain_step(model, opt, x):
    opt.zero_grad()
    seq_losses(model, x).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def step_counters(opt):
    return [st["step"] for st in opt.state.values() if torch.is_tensor(st.get("step"))]


def count(layers: int, config: dict | None, warm: int = 12):
    """(ops, syncs) of step `warm` (after `warm` plain steps, so Adam is past its cold steps)."""
    model, opt, data, targets = workload(layers)
    for s in range(warm):
        plain_step(model, opt, batch(data, s)[0])
    model, opt = copy.deepcopy((model, opt))
    x, ids = batch(data, warm)
    if config is None:
        plain_step(model, opt, x)  # once outside the counter: lazy state and caches are not counted
        with OpCounter(step_counters(opt)) as c:
            plain_step(model, opt, batch(data, warm + 1)[0])
        return c
    cfg = shardshap.Config(max_grad_norm=1.0, **config)
    with shardshap.Attributor(model, opt, seq_losses, lambda m, t: seq_losses(m, t).mean(), cfg) as attr:
        attr.step(x, ids, targets)  # compiles and warms what the preset compiles
        x, ids = batch(data, warm + 1)
        with OpCounter(step_counters(opt)) as c:
            attr.step(x, ids, targets)
    return c


def main():
    shardshap.foreach.BATCH_KERNELS = True  # the accelerator path (foreach, stacked layers), counted on a CPU
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of " + ", ".join(CONFIGS))
    ap.add_argument("--autocast", action="store_true",
                    help="train (and take the target losses) under bf16 autocast, as bf16 GPU training does")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of each configuration")
    args = ap.parse_args()
    global AUTOCAST
    AUTOCAST = args.autocast
    torch.set_num_threads(2)
    names = args.configs.split(",")
    print("| layers | configuration | ops | ratio vs plain | device syncs |")
    print("|---|---|---|---|---|")
    for layers in args.layers:
        plain = count(layers, None)
        base = sum(plain.ops.values())
        print(f"| {layers} | plain | {base} | 1.00 | {plain.syncs} |", flush=True)
        for name in names:
            c = count(layers, CONFIGS[name])
            total = sum(c.ops.values())
            print(f"| {layers} | {name} | {total} | {total / base:.2f} | {c.syncs} |", flush=True)
            if args.top:
                print("  " + ", ".join(f"{op} {n}" for op, n in (c.ops - plain.ops).most_common(args.top)))


if __name__ == "__main__":
    main()
