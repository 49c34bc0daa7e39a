"""reduce_store: rebuild per-sample totals (value, count) from the step log, bounded memory, parallel.

Two phases, each split over W workers (pool processes, MPI ranks, or the writer's ranks):
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

import multiprocessing as mp
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema
from .schema import COMMITTED, Layout

DEFAULT_MEMORY_BYTES = 256 << 20  # per worker, for the block accumulator
_PIECE_RECORDS = 1 << 21  # spill records read at a time


@dataclass
class BarrierComm:
    """The workers of a reduce: this one's rank, how many there are, and a barrier."""

    rank: int = 0
    size: int = 1
    barrier: object = None

    def sync(self):
        if self.barrier is not None:
            self.barrier()


@dataclass(frozen=True)
class _Plan:
    path: str
    spill: str
    layout: Layout
    committed: tuple
    block_rows: int
    num_blocks: int

    @classmethod
    def make(cls, path: str, workers: int, memory_bytes: int, spill_root: str | None) -> _Plan:
        group = schema.read_group(path)
        attrs = group.attrs.asdict()
        L = Layout.from_attrs(attrs)
        committed = tuple(int(x) for x in schema.open_array(group, COMMITTED)[:])
        R = L.chunks("value")[0]
        nchunks = -(-L.num_samples // R)
        per_row = L.num_targets * 8 + 8  # float64 value + int64 count
        budget_chunks = max(1, memory_bytes // (per_row * R))
        # at least one block per worker so that phase 2 is parallel too
        num_blocks = max(-(-nchunks // budget_chunks), min(workers, nchunks))
        block_rows = -(-nchunks // num_blocks) * R
        num_blocks = -(-L.num_samples // block_rows)
        p = Path(path).resolve()
        root = Path(spill_root) if spill_root else p.parent
        run = re.sub(r"[^A-Za-z0-9_.-]", "_", str(attrs["run_id"]))[:64]
        spill = root / f".{p.name}.reduce-{run}"
        return cls(os.fspath(p), os.fspath(spill), L, committed, block_rows, num_blocks)

    def record_dtype(self) -> np.dtype:
        return np.dtype([("id", "<u4"), ("score", "<f4", (self.layout.num_targets,))])

    def units(self) -> list:
        """(chunk row, rank) of every log chunk that holds counted steps, in a fixed order."""
        c = self.layout.steps_per_chunk
        last_row = max(self.committed) // c  # -1 when nothing is committed
        return [(row, r) for row in range(last_row + 1)
                for r, last in enumerate(self.committed) if row * c <= last]


def _map(plan: _Plan, worker: int, workers: int) -> int:
    """Phase 1: spill this worker's share of the log as (id, scores) records per sample block."""
    import zarr

    L, c = plan.layout, plan.layout.steps_per_chunk
    group = zarr.open_group(plan.path, mode="r")
    ids_arr, score_arr = group["sample_id"], group["score"]
    rec_t = plan.record_dtype()
    files = {}
    n_scores = 0
    try:
        for row, r in plan.units()[worker::workers]:
            cols = slice(r * L.slots_per_rank, (r + 1) * L.slots_per_rank)
            n = min(c, plan.committed[r] + 1 - row * c)  # steps past `committed` never count
            ids = ids_arr[row * c:row * c + c, cols][:n].reshape(-1)
            sc = score_arr[row * c:row * c + c, cols][:n].reshape(-1, L.num_targets)
            keep = ids >= 0
            ids, sc = ids[keep], sc[keep]
            n_scores += sc.size
            blk = ids // plan.block_rows
            if plan.num_blocks > 1:
                order = np.argsort(blk, kind="stable")
                ids, sc, blk = ids[order], sc[order], blk[order]
            bounds = np.searchsorted(blk, np.arange(plan.num_blocks + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                lo, hi = bounds[b], bounds[b + 1]
                rec = np.empty(hi - lo, rec_t)
                rec["id"] = ids[lo:hi] - b * plan.block_rows
                rec["score"] = sc[lo:hi]
                if b not in files:
                    files[b] = open(os.path.join(plan.spill, f"w{worker}_b{b}.bin"), "ab")
                rec.tofile(files[b])
    finally:
        for f in files.values():
            f.close()
    return n_scores


def _reduce(plan: _Plan, worker: int, workers: int) -> None:
    """Phase 2: sum the spill of this worker's sample blocks and write their value/count rows."""
    import zarr

    L = plan.layout
    group = zarr.open_group(plan.path, mode="r+")
    value, count = group["value"], group["count"]
    rec_t = plan.record_dtype()
    spill = Path(plan.spill)
    for b in range(worker, plan.num_blocks, workers):
        lo = b * plan.block_rows
        rows = min(plan.block_rows, L.num_samples - lo)
        acc = np.zeros((L.num_targets, rows), np.float64)  # target-major: bincount adds in place
        cnt = np.zeros(rows, np.int64)
        for f in sorted(spill.glob(f"w*_b{b}.bin")):
            with open(f, "rb") as fh:
                while True:
                    rec = np.fromfile(fh, dtype=rec_t, count=_PIECE_RECORDS)
                    if rec.size == 0:
                        break
                    ids = rec["id"].astype(np.intp)
                    cnt += np.bincount(ids, minlength=rows)
                    for k in range(L.num_targets):
                        acc[k] += np.bincount(ids, weights=rec["score"][:, k], minlength=rows)
        value[lo:lo + rows] = acc.T
        count[lo:lo + rows] = cnt


def _pool_map(args):
    return _map(*args)


def _pool_reduce(args):
    return _reduce(*args)


def _mpi_comm():
    """COMM_WORLD when this process was started by mpiexec with more than one rank, else None."""
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    if not size or int(size) <= 1:
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return BarrierComm(comm.Get_rank(), comm.Get_size(), comm.Barrier) if comm.Get_size() > 1 else None


def reduce_store(path, processes: int | None = None, *, comm: BarrierComm | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, spill_dir=None) -> dict:
    """Rebuild `value` and `count` from the log and record them as current in the attributes.

    processes: worker processes of a local pool (default: CPU count; 1 runs inline).
    comm: run as one of `comm.size` cooperating processes (all must call); by default, under
      `mpiexec -n W` every MPI rank takes part.
    memory_bytes: accumulator budget per worker; more samples than fit are reduced in blocks.
    spill_dir: directory for temporary spill files (default: next to the store).
    Returns a summary dict (scores reduced, blocks, workers).
    """
    path = os.fspath(path)
    comm = comm or _mpi_comm()
    if comm is not None and comm.size > 1:
        workers, me = comm.size, comm.rank
    else:
        comm, me = None, 0
        workers = max(1, int(processes or os.cpu_count() or 1))
    plan = _Plan.make(path, workers, memory_bytes, spill_dir)
    if comm is None:
        workers = max(1, min(workers, max(len(plan.units()), plan.num_blocks)))
    if me == 0:
        schema.sweep_partials(path)
        shutil.rmtree(plan.spill, ignore_errors=True)  # leftovers of a killed reduce
        os.makedirs(plan.spill)
        schema.read_group(path, mode="r+").attrs["totals"] = None
    n_scores = 0
    try:
        if comm is not None:
            comm.sync()
            n_scores = _map(plan, me, workers)
            comm.sync()
            _reduce(plan, me, workers)
            comm.sync()
        elif workers == 1:
            n_scores = _map(plan, 0, 1)
            _reduce(plan, 0, 1)
        else:
            # spawn: forking a process whose zarr event-loop thread runs can deadlock
            with mp.get_context("spawn").Pool(workers) as pool:
                n_scores = sum(pool.map(_pool_map, [(plan, w, workers) for w in range(workers)]))
                pool.map(_pool_reduce, [(plan, w, workers) for w in range(workers)])
    finally:
        if me == 0:
            shutil.rmtree(plan.spill, ignore_errors=True)
    if me == 0:
        group = schema.read_group(path, mode="r+")
        group.attrs["totals"] = {"committed_step": list(plan.committed)}
    if comm is not None:
        comm.sync()  # nobody reads the totals before they are marked current
    return {"scores": n_scores, "blocks": plan.num_blocks, "workers": workers,
            "block_rows": plan.block_rows}
