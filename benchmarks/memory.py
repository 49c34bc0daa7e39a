"""Memory: peak memory of ONE optimizer step, plain training vs attributed, side by side, in one run.

Workload: a GPT-2 (HF GPT2LMHeadModel from a config, nothing downloaded) with 4 layers, n_embd 256, 4 heads,
vocab 1024, T=256 tokens, fp32, AdamW(lr=1e-4) with clipping at 1.0; random tokens, micro-batches of 8
sequences, one optimizer step over 1, 2, 4, 8 or 16 of them (gradient accumulation); two targets (two
held-out batches of 4 sequences; the target loss is their mean LM losses, a [2] tensor).

Modes: `plain` (per micro-batch `(losses.sum() / n).backward()`, then clip_grad_norm_ and optimizer.step()),
and attributed `cached` (Config(schedule="cached")), `cached-fast` (the same with preset="fast") and
`streaming` (Config(schedule="streaming")), all with max_grad_norm=1.0 and cold_start="none" (the warm-step
path). Activation checkpointing: none, nonreentrant, reentrant (HF gradient_checkpointing_enable).

Each (mode, micro-batches, checkpointing) cell runs in a FRESH subprocess: it builds the model, takes 2
warm-up steps the way it takes the measured one (so the optimizer state is warm), frees the gradients,
then measures one more step: its peak memory above the memory held just before it, and its wall time.
  CPU:  the resident set high-water mark (VmHWM, reset through /proc/self/clear_refs; Linux) minus VmRSS
        before the step. glibc's mmap threshold is fixed at 128 KiB for the whole process, so that freed
        tensors leave the resident set and the high-water mark counts live memory (the page faults this
        costs are in every mode's step time alike).
  CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the step.
The memory held between steps (e.g. streaming's copy of the previous gradient) is in the base, not in
the peak; the raw results (--json) have the base too.

Table 1: plain's peak and each attributed mode's extra over plain (same micro-batches and checkpointing).
Table 2: the derived ratios: streaming's extra at 8 micro-batches / at 1, streaming's extra / cached's
extra at 8, how much of checkpointing's saving on plain streaming keeps, and streaming / cached step time
(one step per cell: the times need an idle machine to mean anything).

    python benchmarks/memory.py --quick        # micro-batches 1 and 8, T=128: 24 cells, ~20 minutes on 2 CPU cores
    python benchmarks/memory.py                # micro-batches 1, 2, 4, 8, 16, T=256: 60 cells
    python benchmarks/memory.py --device cuda --json runs/memory.json
    python benchmarks/memory.py --batched --modes cached-fast --micro 1,2 --checkpointing none  # accelerator path
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # preset fast compiles: no pool of compile workers

import torch  # noqa: E402
from throughput import seq_losses  # noqa: E402  (the same per-sequence loss as the throughput benchmark)

MODES = ["plain", "cached", "cached-fast", "streaming"]
CHECKPOINTING = ["none", "nonreentrant", "reentrant"]
MICRO_BATCH = 8        # sequences per micro-batch
VOCAB = 1024
WARMUP_STEPS = 2


# ----------------------------------------------------------------------------------------- one cell (child)
def train_loss(model, batch):
    return seq_losses(model, batch)


def target_loss(model, targets):
    """Two targets: the mean loss of each held-out batch of 4 sequences, [2]."""
    return seq_losses(model, targets).view(2, -1).mean(1)


def build_model(T: int, checkpointing: str, device):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=256, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(device)
    if checkpointing != "none":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.train()
    return model


def micro_batches(step: int, micro: int, T: int, device):
    """The step's micro-batches of random tokens and their sample ids (the same in every mode)."""
    g = torch.Generator().manual_seed(1000 + step)
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, T), generator=g).to(device) for _ in range(micro)]
    ids = [step * micro * MICRO_BATCH + j * MICRO_BATCH + torch.arange(MICRO_BATCH) for j in range(micro)]
    return batches, ids


def attributed_config(mode: str):
    import shardshap
    extra = {"cached": dict(schedule="cached"), "cached-fast": dict(schedule="cached", preset="fast"),
             "streaming": dict(schedule="streaming")}[mode]
    return shardshap.Config(max_grad_norm=1.0, cold_start="none", **extra)


def plain_step(model, opt, batches):
    opt.zero_grad(set_to_none=True)
    n = sum(len(b) for b in batches)
    for b in batches:
        (train_loss(model, b).sum() / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_cell(mode: str, micro: int, checkpointing: str, T: int, device: torch.device) -> dict:
    """Build, warm up, measure one step; returns the cell's result."""
    import shardshap
    libc = None
    if device.type == "cpu":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: big blocks are mmapped, and unmapped when freed
    model = build_model(T, checkpointing, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(7)
    targets = torch.randint(0, VOCAB, (2 * 4, T), generator=g).to(device)  # two held-out batches of 4
    attr = None if mode == "plain" else shardshap.Attributor(model, opt, train_loss, target_loss,
                                                             attributed_config(mode))

    def step(s):
        batches, ids = micro_batches(s, micro, T, device)
        if attr is None:
            plain_step(model, opt, batches)
        else:
            attr.step(batches, ids, targets)

    for s in range(WARMUP_STEPS):
        step(s)
    opt.zero_grad(set_to_none=True)  # the measured step allocates its gradients like the first one did
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _proc_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    step(WARMUP_STEPS)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_kib("VmHWM") * 1024
    if attr is not None:
        attr.close()
    return dict(mode=mode, micro=micro, checkpointing=checkpointing, T=T, device=str(device),
                peak_mib=(peak - base) / 2 ** 20, base_mib=base / 2 ** 20, seconds=seconds)


# ----------------------------------------------------------------------------------------- the run (parent)
def run_in_subprocess(mode, micro, checkpointing, T, device, timeout, batched=False) -> dict:
    cell = dict(mode=mode, micro=micro, checkpointing=checkpointing)
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", mode, str(micro), checkpointing,
           "--T", str(T), "--device", device] + (["--batched"] if batched else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = err[-1].strip() if err else f"exit status {proc.returncode}"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    return {**cell, "error": why}


def fmt(x, digits=0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def short_error(r: dict) -> str:
    msg = r["error"].replace("|", "/")
    return "error: " + (msg if len(msg) <= 80 else msg[:77] + "...")


def print_tables(results: dict, modes, micros, ckpts, T, device):
    def ok(mode, m, c):
        r = results.get((mode, m, c))
        return r if r is not None and "error" not in r else None

    def extra(mode, m, c):  # attributed peak - plain peak, MiB
        r, p = ok(mode, m, c), ok("plain", m, c)
        return None if r is None or p is None else r["peak_mib"] - p["peak_mib"]

    def ratio(a, b, digits=2):
        return "-" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}"

    print(f"\n### Peak memory of one optimizer step (MiB above the memory held before it), {device}, T={T}, "
          f"{MICRO_BATCH} sequences per micro-batch\n")
    print("| checkpointing | micro-batches | " + " | ".join(
        ["plain peak" if m == "plain" else f"{m} extra" for m in modes]) + " |")
    print("|---|---|" + "---|" * len(modes))
    for c in ckpts:
        for m in micros:
            cells = []
            for mode in modes:
                r = results.get((mode, m, c))
                if r is not None and "error" in r:
                    cells.append(short_error(r))
                elif mode == "plain":
                    cells.append(fmt(r and r["peak_mib"]))
                else:
                    e = extra(mode, m, c)
                    cells.append("-" if e is None else f"{e:+.0f}")
            print(f"| {c} | {m} | " + " | ".join(cells) + " |")

    lo, hi = min(micros), (8 if 8 in micros else max(micros))

    def t(mode, m, c):  # the measured step's seconds
        r = ok(mode, m, c)
        return r and r["seconds"]

    print("\n### Derived ratios\n")
    print(f"| checkpointing | streaming extra, {hi} / {lo} micro-batches | streaming extra / cached extra at "
          f"{hi} | plain peak saved by checkpointing at {hi} (MiB) | streaming peak saved by checkpointing at "
          f"{hi} (MiB) | share of the saving streaming keeps | step time streaming / cached at {hi} |")
    print("|---|---|---|---|---|---|---|")
    for c in ckpts:
        saved_plain = saved_stream = None
        if c != "none":
            p0, p1, s0, s1 = ok("plain", hi, "none"), ok("plain", hi, c), ok("streaming", hi, "none"), \
                ok("streaming", hi, c)
            if p0 and p1:
                saved_plain = p0["peak_mib"] - p1["peak_mib"]
            if s0 and s1:
                saved_stream = s0["peak_mib"] - s1["peak_mib"]
        print(f"| {c} | {ratio(extra('streaming', hi, c), extra('streaming', lo, c))} | "
              f"{ratio(extra('streaming', hi, c), extra('cached', hi, c))} | {fmt(saved_plain)} | "
              f"{fmt(saved_stream)} | {ratio(saved_stream, saved_plain)} | "
              f"{ratio(t('streaming', hi, c), t('cached', hi, c))} |")

    print("\n### Step time of the measured step (s)\n")
    print("| checkpointing | micro-batches | " + " | ".join(modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for c in ckpts:
        for m in micros:
            print(f"| {c} | {m} | " + " | ".join(
                "-" if not ok(mode, m, c) else f"{ok(mode, m, c)['seconds']:.2f}" for mode in modes) + " |")
    sys.stdout.flush()


def csv(kind, allowed=None):
    def parse(s):
        vals = [kind(v) for v in s.split(",") if v]
        bad = [v for v in vals if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {allowed}")
        return vals
    return parse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro", type=csv(int), default=[1, 2, 4, 8, 16], help="micro-batches per step")
    ap.add_argument("--modes", type=csv(str, MODES), default=MODES)
    ap.add_argument("--checkpointing", type=csv(str, CHECKPOINTING), default=CHECKPOINTING)
    ap.add_argument("--T", type=int, default=None, help="tokens per sequence (default 256; 128 with --quick)")
    ap.add_argument("--quick", action="store_true", help="micro-batches 1 and 8, T=128")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the raw results to this path")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--batched", action="store_true",
                    help="attribution on its accelerator path on this CPU (shardshap.foreach.BATCH_KERNELS: layers "
                         "stacked, bf16 captures cast with their stack)")
    ap.add_argument("--cell", nargs=3, metavar=("MODE", "MICRO", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    T = args.T or (128 if args.quick else 256)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")

    if args.cell:  # child: one cell, one JSON line
        mode, micro, ckpt = args.cell
        if args.batched:
            import shardshap.foreach
            shardshap.foreach.BATCH_KERNELS = True
        print(json.dumps(run_cell(mode, int(micro), ckpt, T, torch.device(args.device))), flush=True)
        return

    micros = [1, 8] if args.quick and "--micro" not in sys.argv else args.micro
    modes = ["plain"] + [m for m in args.modes if m != "plain"]  # extras are over plain: always measure it
    import shardshap
    print(f"torch {torch.__version__}, shardshap {shardshap.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ", 2 threads")
          + f"; T={T}, micro-batches {micros}, modes {modes}, checkpointing {args.checkpointing}", flush=True)
    results = {}
    for c in args.checkpointing:
        for m in micros:
            for mode in modes:
                t0 = time.perf_counter()
                r = run_in_subprocess(mode, m, c, T, args.device, args.timeout, args.batched)
                results[(mode, m, c)] = r
                what = short_error(r) if "error" in r else f"peak {r['peak_mib']:.0f} MiB, step {r['seconds']:.2f} s"
                print(f"  [{c}, {m} micro, {mode}] {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)
    print_tables(results, modes, micros, args.checkpointing, T, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(results.values()), f, indent=1)


if __name__ == "__main__":
    main()
