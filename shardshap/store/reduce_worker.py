"""The two phases of reduce_store for one worker; runnable as a script so that pool workers
import only numpy and zarr (not shardshap or torch).  Usage: python reduce_worker.py PHASE PLAN W N

The plan is a JSON dict (path, spill, num_samples, num_targets, slots_per_rank, steps_per_chunk,
committed, block_rows, num_blocks); worker W of N takes every N-th log chunk (map) or sample block
(reduce).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import zarr

PIECE_RECORDS = 1 << 21  # spill records summed at a time


def record_dtype(num_targets: int) -> np.dtype:
    # sample id relative to its block (blocks are far below 2**32 rows) and the K scores
    return np.dtype([("id", "<u4"), ("score", "<f4", (num_targets,))])


def units(plan: dict) -> list:
    """(chunk row, rank) of every log chunk holding counted steps, in a fixed order."""
    c, committed = plan["steps_per_chunk"], plan["committed"]
    last_row = max(committed) // c  # -1 when nothing is committed
    return [(row, r) for row in range(last_row + 1)
            for r, last in enumerate(committed) if row * c <= last]


def map_phase(plan: dict, worker: int, workers: int) -> int:
    """Spill this worker's share of the log as (id, scores) records, one file per sample block."""
    c, spr, K = plan["steps_per_chunk"], plan["slots_per_rank"], plan["num_targets"]
    block_rows, num_blocks = plan["block_rows"], plan["num_blocks"]
    group = zarr.open_group(plan["path"], mode="r")
    ids_arr, score_arr = group["sample_id"], group["score"]
    rec_t = record_dtype(K)
    files, n_scores = {}, 0
    try:
        for row, r in units(plan)[worker::workers]:
            cols = slice(r * spr, (r + 1) * spr)
            n = min(c, plan["committed"][r] + 1 - row * c)  # steps past `committed` never count
            ids = ids_arr[row * c:row * c + c, cols][:n].reshape(-1)
            sc = score_arr[row * c:row * c + c, cols][:n].reshape(-1, K)
            keep = ids >= 0  # -1: empty slot
            ids, sc = ids[keep], sc[keep]
            n_scores += sc.size
            blk = ids // block_rows
            if num_blocks > 1:
                order = np.argsort(blk, kind="stable")
                ids, sc, blk = ids[order], sc[order], blk[order]
            bounds = np.searchsorted(blk, np.arange(num_blocks + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                lo, hi = bounds[b], bounds[b + 1]
                rec = np.empty(hi - lo, rec_t)
                rec["id"] = ids[lo:hi] - b * block_rows
                rec["score"] = sc[lo:hi]
                if b not in files:
                    files[b] = open(os.path.join(plan["spill"], f"w{worker}_b{b}.bin"), "ab")
                rec.tofile(files[b])
    finally:
        for f in files.values():
            f.close()
    return n_scores


def reduce_phase(plan: dict, worker: int, workers: int) -> None:
    """Sum the spill of this worker's sample blocks in float64; write their value/count rows."""
    N, K, block_rows = plan["num_samples"], plan["num_targets"], plan["block_rows"]
    group = zarr.open_group(plan["path"], mode="r+")
    value, count = group["value"], group["count"]
    rec_t = record_dtype(K)
    for b in range(worker, plan["num_blocks"], workers):
        lo = b * block_rows
        rows = min(block_rows, N - lo)
        acc = np.zeros((K, rows), np.float64)  # target-major so that bincount adds in place
        cnt = np.zeros(rows, np.int64)
        for f in sorted(Path(plan["spill"]).glob(f"w*_b{b}.bin")):
            with open(f, "rb") as fh:
                while (rec := np.fromfile(fh, dtype=rec_t, count=PIECE_RECORDS)).size:
                    ids = rec["id"].astype(np.intp)
                    cnt += np.bincount(ids, minlength=rows)
                    for k in range(K):
                        acc[k] += np.bincount(ids, weights=rec["score"][:, k], minlength=rows)
        # blocks are whole value chunks, so no two workers ever write one chunk
        value[lo:lo + rows] = acc.T
        count[lo:lo + rows] = cnt


if __name__ == "__main__":
    phase, plan_file, w, n = sys.argv[1:5]
    with open(plan_file) as fh:
        plan = json.load(fh)
    if phase == "map":
        out = map_phase(plan, int(w), int(n))
        with open(os.path.join(plan["spill"], f"w{w}.scores"), "w") as fh:
            fh.write(str(out))
    else:
        reduce_phase(plan, int(w), int(n))
