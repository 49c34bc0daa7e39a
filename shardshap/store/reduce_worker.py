"""The two phases of reduce_store for one worker; runnable as a script so that pool workers
import only numpy and zarr (not shardshap or torch).  Usage: python reduce_worker.py PLAN W N

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

PIECE_RECORDS = 1 << 20  # spill records summed at a time


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
            if not (keep := ids >= 0).all():  # -1: empty slot
                ids, sc = ids[keep], sc[keep]
            n_scores += sc.size
            blk = ids // block_rows
            rec = np.empty(ids.size, rec_t)
            rec["id"] = ids - blk * block_rows
            rec["score"] = sc
            if num_blocks > 1:  # group the records by block; 16-bit keys get numpy's radix sort
                blk = blk.astype(np.uint16 if num_blocks <= 1 << 16 else np.int64)
                order = np.argsort(blk, kind="stable")
                rec, blk = rec[order], blk[order]
            bounds = np.searchsorted(blk, np.arange(num_blocks + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                if b not in files:
                    files[b] = open(os.path.join(plan["spill"], f"w{worker}_b{b}.bin"), "ab")
                rec[bounds[b]:bounds[b + 1]].tofile(files[b])
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
        piece = PIECE_RECORDS
        for f in sorted(Path(plan["spill"]).glob(f"w*_b{b}.bin")):
            with open(f, "rb") as fh:
                while (rec := np.fromfile(fh, dtype=rec_t, count=piece)).size:
                    ids = rec["id"].astype(np.intp)
                    cnt += np.bincount(ids, minlength=rows)
                    weights = np.ascontiguousarray(rec["score"].T, dtype=np.float64)
                    for k in range(K):
                        acc[k] += np.bincount(ids, weights=weights[k], minlength=rows)
        # blocks are whole value chunks, so no two workers ever write one chunk; write chunk by
        # chunk so that the transposed copy stays one chunk large
        step = value.chunks[0]
        for a in range(0, rows, step):
            value[lo + a:lo + a + step] = acc[:, a:a + step].T
        count[lo:lo + rows] = cnt


def main(plan_file: str, worker: int, workers: int):
    """Pool worker: map, report the score count on stdout, wait for the go-ahead, reduce."""
    with open(plan_file) as fh:
        plan = json.load(fh)
    print(map_phase(plan, worker, workers), flush=True)
    if sys.stdin.readline().strip() == "reduce":  # every worker's spill is complete
        reduce_phase(plan, worker, workers)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
