"""Score store throughput: stream a synthetic log through ScoreWriter, reduce it, print the table.

    python benchmarks/store_throughput.py                     # 100 M scores (the documented run)
    python benchmarks/store_throughput.py --scores 25e6       # shorter log: same reduce memory
    python benchmarks/store_throughput.py --flush-only        # only flush() vs flush(durable=True)

Write throughput counts scores (slots x targets) per second from the first write_step to the end
of flush() (everything handed to the OS), in one rank with its background writer thread, and
again including an os.sync() (everything on the device). Reduce runs
`reduce_store` in a separate process with --processes workers; its peak memory is the largest
sum of resident sets of that process and its workers, sampled from /proc every 50 ms. Then the
measured rates are projected to a 1-billion-sample, 4-target run.

The flush section writes the same synthetic log twice, calling flush() every --flush-every steps
(a checkpoint cadence) in one store and flush(durable=True) in the other, and times each call.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from shardshap.store import ScoreWriter  # noqa: E402


def du(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_log(path, scores: int, samples: int, slots: int, targets: int):
    """Stream `scores` synthetic scores (heavy-tailed, as measured in the infra notes)."""
    rng = np.random.default_rng(0)
    steps = -(-scores // (slots * targets))
    perm = rng.permutation(samples)  # epochs walk a fixed permutation: ids distinct per step
    pool = (rng.standard_t(3, size=(64, slots, targets)) * 1e-4).astype(np.float32)
    loss = rng.random((64, slots)).astype(np.float32)
    w = ScoreWriter(path, run_id="bench", config={"bench": True}, targets=[f"t{k}" for k in range(targets)],
                    num_samples=samples, slots_per_rank=slots, max_steps=steps, overwrite=True,
                    reduce_on_close=False)
    lat = np.empty(steps)
    t0 = time.perf_counter()
    for t in range(steps):
        start = (t * slots) % (samples - slots)
        ids = perm[start:start + slots]
        c0 = time.perf_counter()
        w.write_step(t, ids, pool[t % 64], loss[t % 64], lr=1e-3, loss=1.0, wall_time=t)
        lat[t] = time.perf_counter() - c0
    w.flush()
    elapsed = time.perf_counter() - t0
    w.close()
    os.sync()  # to the device: what a sustained run must also keep up with
    synced = time.perf_counter() - t0
    return steps * slots * targets, elapsed, synced, lat, w.layout


def flush_cost(root, steps: int, every: int, samples: int, slots: int, targets: int) -> dict:
    """Seconds of each flush call, {durable: [s, ...]}, with the same log and cadence for both kinds."""
    rng = np.random.default_rng(0)
    pool = (rng.standard_t(3, size=(64, slots, targets)) * 1e-4).astype(np.float32)
    loss = rng.random((64, slots)).astype(np.float32)
    perm = rng.permutation(samples)
    out = {}
    for durable in (False, True):
        os.sync()  # start both with a clean page cache writeback
        w = ScoreWriter(Path(root) / f"flush-{durable}.zarr", run_id="bench", config={},
                        targets=[f"t{k}" for k in range(targets)], num_samples=samples, slots_per_rank=slots,
                        max_steps=steps, overwrite=True, reduce_on_close=False)
        times = []
        for t in range(steps):
            start = (t * slots) % (samples - slots)
            w.write_step(t, perm[start:start + slots], pool[t % 64], loss[t % 64], lr=1e-3, loss=1.0)
            if (t + 1) % every == 0:
                c0 = time.perf_counter()
                w.flush(durable=durable)
                times.append(time.perf_counter() - c0)
        out[durable] = (times, w.layout.steps_per_chunk)
        w.close()
    return out


def print_flush_cost(root, a):
    res = flush_cost(root, a.flush_steps, a.flush_every, a.samples, a.slots, a.targets)
    chunk = res[False][1]
    print(f"\nflush cost: a flush every {a.flush_every} steps of {a.slots} slots x {a.targets} targets, "
          f"{a.flush_steps} steps ({len(res[False][0])} flushes each; chunk rows of {chunk} steps)\n")
    print("| flush | median ms | mean ms | max ms |\n|---|---|---|---|")
    for durable, label in ((False, "flush()"), (True, "flush(durable=True)")):
        t = np.array(res[durable][0]) * 1e3
        print(f"| {label} | {np.median(t):.1f} | {t.mean():.1f} | {t.max():.1f} |")


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc/PID/task/*/children)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(status.split("VmRSS:")[1].split()[0]) * 1024 if "VmRSS:" in status else 0
        kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir()
                for k in (t / "children").read_text().split()]
    except (OSError, IndexError):
        return 0
    return rss + sum(_tree_rss(k) for k in kids)


def reduce_in_subprocess(path, processes: int, memory_mb: int):
    """Run reduce_store in a fresh process; returns (seconds inside reduce_store, process wall
    seconds, peak of the summed RSS of the process and its workers, sampled every 50 ms)."""
    code = ("import sys, time; sys.path.insert(0, %r); from shardshap.store import reduce_store; "
            "t = time.perf_counter(); reduce_store(%r, processes=%d, memory_bytes=%d << 20); "
            "print(time.perf_counter() - t)"
            % (os.path.join(os.path.dirname(__file__), ".."), str(path), processes, memory_mb))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit("reduce failed")
    return float(proc.stdout.read().strip()), wall, peak


def check_totals(path, layout, n_scores):
    """Independent check: sum of all totals equals the sum of every score written."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    count = g["count"][:]
    assert count.sum() * layout.num_targets == n_scores, (count.sum(), n_scores)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", type=float, default=100e6, help="scores to write (>= 1e8 for the docs)")
    ap.add_argument("--samples", type=int, default=10_000_000, help="num_samples of the synthetic run")
    ap.add_argument("--slots", type=int, default=1024, help="slots_per_rank (local batch)")
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2, help="reduce worker processes")
    ap.add_argument("--memory-mb", type=int, default=128, help="reduce accumulator budget per worker")
    ap.add_argument("--dir", default=None, help="where to put the store (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--flush-only", action="store_true", help="only the flush() vs flush(durable=True) section")
    ap.add_argument("--flush-every", type=int, default=100, help="steps between flushes (checkpoint cadence)")
    ap.add_argument("--flush-steps", type=int, default=2000, help="steps written in each flush run")
    a = ap.parse_args()

    root = Path(a.dir or tempfile.mkdtemp(prefix="shardshap-bench-"))
    if a.flush_only:
        print_flush_cost(root, a)
        if not a.keep and a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        return
    path = root / "bench.zarr"
    n, w_s, w_sync, lat, layout = write_log(path, int(a.scores), a.samples, a.slots, a.targets)
    write_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log_bytes = du(path)
    r_s, r_wall, r_peak = reduce_in_subprocess(path, a.processes, a.memory_mb)
    check_totals(path, layout, n)
    store_bytes = du(path)

    raw_per_score = 4 + (8 + 4) / a.targets  # float32 score + int64 id and float32 loss per slot
    ratio = n * raw_per_score / log_bytes
    rows = [
        ("scores written",
         f"{n / 1e6:.1f} M ({n // (a.slots * a.targets)} steps x {a.slots} slots x {a.targets} targets)"),
        ("write throughput (flushed to the OS)", f"{n / w_s / 1e6:.1f} M scores/s ({w_s:.2f} s)"),
        ("write throughput incl. os.sync() to the device", f"{n / w_sync / 1e6:.1f} M scores/s ({w_sync:.2f} s)"),
        ("write_step call, median / p99 / max", f"{np.median(lat) * 1e6:.0f} us / "
         f"{np.percentile(lat, 99) * 1e6:.0f} us / {lat.max() * 1e3:.1f} ms; {lat.sum() / w_s:.0%} of the run "
         "inside write_step (the loop does nothing else, so the bounded queue throttles it)"),
        ("writer process peak RSS", f"{write_peak / 2**20:.0f} MiB (incl. the synthetic data)"),
        ("log on disk", f"{log_bytes / 2**20:.0f} MiB ({log_bytes / n:.2f} B/score, compression {ratio:.2f}x)"),
        ("reduce throughput", f"{n / r_s / 1e6:.1f} M scores/s ({r_s:.2f} s in reduce_store, "
                              f"{a.processes} workers; {r_wall:.2f} s incl. interpreter start)"),
        ("reduce peak memory (sum of RSS, all its processes)", f"{r_peak / 2**20:.0f} MiB"),
        ("store incl. totals", f"{store_bytes / 2**20:.0f} MiB for {a.samples / 1e6:.0f} M samples"),
    ]
    print(f"\nshardshap store benchmark ({os.cpu_count()} CPUs, {a.samples / 1e6:g} M samples)\n")
    print("| quantity | measured |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")

    # Projection: 1e9 samples, 4 targets, one epoch (each sample takes part in one step).
    N, K = 1e9, 4
    scores = N * K
    log = scores * log_bytes / n * (4 + 12 / K) / raw_per_score  # same compression, K = 4 layout
    totals = N * (K * 8 + 8) / 1.0  # float64 values (incompressible) + int64 counts (upper bound)
    spill = N * (4 + 4 * K)
    print("\nProjection: 1 B samples x 4 targets, 1 epoch (4 B scores); per extra epoch add the log again\n")
    print("| quantity | projected |\n|---|---|")
    print(f"| log on disk | {log / 1e9:.0f} GB |")
    print(f"| totals value + count (uncompressed bound) | {totals / 1e9:.0f} GB |")
    print(f"| write time at the measured rate, 1 rank / 8 ranks | {scores / (n / w_s) / 60:.1f} min / "
          f"{scores / (n / w_s) / 8 / 60:.1f} min (if the file system keeps up) |")
    print(f"| reduce time at the measured rate ({a.processes} workers) | {scores / (n / r_s) / 60:.1f} min |")
    print(f"| reduce temporary spill | {spill / 1e9:.0f} GB |")
    print(f"| reduce memory per worker | ~{a.memory_mb} MiB accumulator + one log chunk; "
          f"{int(np.ceil(N * (K * 8 + 16) / (a.memory_mb << 20)))} sample blocks |")
    print_flush_cost(root, a)
    if not a.keep and a.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
