"""reduce_store: rebuild per-sample totals (value, count) from the step log, bounded memory, parallel.

Two phases, each split over W workers (local worker processes, MPI ranks, or the writer's ranks):
  1. map: each worker reads a share of the log chunks (only steps <= each rank's committed step),
     drops empty slots and appends (sample id, scores) records to spill files, one per
     (worker, sample block). A sample block is a range of samples whose accumulator fits in
     `memory_bytes`.
  2. reduce: each worker takes whole sample blocks, sums their spill files with np.bincount in
     float64 and writes the block's value/count rows (whole chunks; blocks never share a chunk).
Memory per worker is one log chunk plus one block accumulator, whatever the log length; the log is
read once and the spill (uncompressed records) is written and read once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreWriteError
from . import reduce_worker, schema
from .schema import COMMITTED, Layout

DEFAULT_MEMORY_BYTES = 128 << 20  # per worker, for the block accumulator


@dataclass
class BarrierComm:
    """The cooperating processes of a reduce: this one's rank, how many, and a barrier callable."""

    rank: int = 0
    size: int = 1
    barrier: object = None

    def sync(self):
        if self.barrier is not None:
            self.barrier()


def make_plan(path: str, workers: int, memory_bytes: int, spill_root=None) -> dict:
    """Everything a worker needs, as JSON; identical on every process that computes it."""
    group = schema.read_group(path)
    attrs = group.attrs.asdict()
    L = Layout.from_attrs(attrs)
    committed = [int(x) for x in schema.open_array(group, COMMITTED)[:]]
    R = L.chunks("value")[0]
    nchunks = -(-L.num_samples // R)
    per_row = L.num_targets * 8 + 16  # float64 values, int64 count, one bincount temporary
    budget_chunks = max(1, memory_bytes // (per_row * R))
    # at least one block per worker so that phase 2 is parallel too
    num_blocks = max(-(-nchunks // budget_chunks), min(workers, nchunks))
    block_rows = -(-nchunks // num_blocks) * R
    p = Path(path).resolve()
    run = re.sub(r"[^A-Za-z0-9_.-]", "_", str(attrs["run_id"]))[:64]
    spill = (Path(spill_root) if spill_root else p.parent) / f".{p.name}.reduce-{run}"
    return {"path": os.fspath(p), "spill": os.fspath(spill), "num_samples": L.num_samples,
            "num_targets": L.num_targets, "slots_per_rank": L.slots_per_rank,
            "steps_per_chunk": L.steps_per_chunk, "committed": committed,
            "block_rows": block_rows, "num_blocks": -(-L.num_samples // block_rows)}


def _mpi_comm():
    """COMM_WORLD when this process was started by mpiexec with more than one rank, else None."""
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    if not size or int(size) <= 1:
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return BarrierComm(comm.Get_rank(), comm.Get_size(), comm.Barrier) if comm.Get_size() > 1 else None


def _run_pool(plan_file: str, workers: int) -> int:
    """Both phases in `workers` fresh processes (a script: no pickling, no fork of zarr's threads).

    Each worker prints its score count after the map phase and reduces once told that all maps
    are done. Returns the number of scores reduced."""
    procs = [subprocess.Popen([sys.executable, reduce_worker.__file__, plan_file, str(w), str(workers)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for w in range(workers)]
    try:
        counts = [p.stdout.readline().strip() for p in procs]
        ok = all(c.isdigit() for c in counts)
        for p in procs:
            p.stdin.write("reduce\n" if ok else "stop\n")
            p.stdin.close()
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if not ok or any(codes):
        raise StoreWriteError(f"reduce worker processes failed (exit codes {codes})")
    return sum(int(c) for c in counts)


def reduce_store(path, processes: int | None = None, *, comm: BarrierComm | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, spill_dir=None) -> dict:
    """Rebuild `value` and `count` from the log and mark them current in the attributes.

    processes: local worker processes (default: CPU count; 1 runs inline in this process).
    comm: run as one of `comm.size` cooperating processes that all call reduce_store; by default,
      under `mpiexec -n W` every MPI rank takes part.
    memory_bytes: accumulator budget per worker; more samples than fit are reduced in blocks.
    spill_dir: directory for the temporary spill files (default: next to the store).
    Returns a summary: scores reduced (by this process's workers), blocks, workers.
    """
    path = os.fspath(path)
    comm = comm or _mpi_comm()
    if comm is not None and comm.size > 1:
        workers, me = comm.size, comm.rank
    else:
        comm, me = None, 0
        workers = max(1, int(processes or os.cpu_count() or 1))
    plan = make_plan(path, workers, memory_bytes, spill_dir)
    if comm is None:  # no idle workers
        workers = max(1, min(workers, max(len(reduce_worker.units(plan)), plan["num_blocks"])))
    plan_file = os.path.join(plan["spill"], "plan.json")
    if me == 0:
        schema.sweep_partials(path)
        shutil.rmtree(plan["spill"], ignore_errors=True)  # leftovers of a killed reduce
        os.makedirs(plan["spill"])
        schema.read_group(path, mode="r+").attrs["totals"] = None
    n_scores = 0
    try:
        if comm is not None:
            comm.sync()
            n_scores = reduce_worker.map_phase(plan, me, workers)
            comm.sync()
            reduce_worker.reduce_phase(plan, me, workers)
            comm.sync()
        elif workers == 1:
            n_scores = reduce_worker.map_phase(plan, 0, 1)
            reduce_worker.reduce_phase(plan, 0, 1)
        else:
            with open(plan_file, "w") as fh:
                json.dump(plan, fh)
            n_scores = _run_pool(plan_file, workers)
    finally:
        if me == 0:
            shutil.rmtree(plan["spill"], ignore_errors=True)
    if me == 0:
        group = schema.read_group(path, mode="r+")
        group.attrs["totals"] = {"committed_step": plan["committed"]}
    if comm is not None:
        comm.sync()  # nobody reads the totals before they are marked current
    return {"scores": n_scores, "blocks": plan["num_blocks"], "workers": workers,
            "block_rows": plan["block_rows"]}
