"""One rank of a synthetic training run that streams scores to a store (launched by tests/unit/store/test_store.py).

The data of every (rank, step) comes from `step_data`, a pure function of its arguments, so the
test can compute the expected totals with plain numpy without reading the store.

    python tests/distributed/workers/store.py PATH --rank R --world W --init tcp://127.0.0.1:PORT [--barrier torch|mpi]
        [--steps S] [--flush-every F] [--die-at D] [--resume-step T] [--resume-via state]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from helpers.store_data import CONFIG, SPR, STEPS_PER_CHUNK, TARGETS, N, step_data


def make_barrier(kind: str, rank: int, world: int, init: str):
    if kind == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD.Barrier, lambda: None
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    def shutdown():
        import gc

        dist.barrier()
        gc.collect()  # lets gloo's threads finish before the interpreter tears down
        dist.destroy_process_group()

    return dist.barrier, shutdown


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--init", default="")
    ap.add_argument("--barrier", default="torch")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--flush-every", type=int, default=10)
    ap.add_argument("--die-at", type=int, default=-1)
    ap.add_argument("--resume-step", type=int, default=None)
    ap.add_argument("--step-time", type=float, default=0.01, help="simulated training seconds/step")
    ap.add_argument("--resume-via", default="arg", choices=["arg", "state"])
    a = ap.parse_args()
    if a.barrier == "mpi":
        a.rank, a.world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])

    from shardshap.store import ScoreWriter

    barrier, shutdown = make_barrier(a.barrier, a.rank, a.world, a.init)
    ckpt = Path(a.path).parent / f"ckpt_rank{a.rank}.json"
    w = ScoreWriter(a.path, run_id="test-run", config=CONFIG, targets=TARGETS, num_samples=N,
                    slots_per_rank=SPR, world_size=a.world, rank=a.rank, barrier=barrier,
                    steps_per_chunk=STEPS_PER_CHUNK, max_steps=256, metadata={"mode": "exact"},
                    resume_step=a.resume_step if a.resume_via == "arg" else None)
    start = 0
    if a.resume_step is not None:
        start = a.resume_step
        if a.resume_via == "state":
            w.load_state_dict({"run_id": "test-run", "world_size": a.world, "next_step": start})
    for t in range(start, a.steps):
        ids, sc, loss = step_data(a.rank, t)
        w.write_step(t, ids, sc, loss, lr=1e-3 * (t + 1), loss=float(t), target_losses=[t, t, t],
                     residual=0.5, wall_time=float(t))
        if (t + 1) % a.flush_every == 0:  # a training checkpoint after step t
            ckpt.write_text(json.dumps(w.state_dict()))
        time.sleep(a.step_time)  # training compute; the writer thread gets to the disk meanwhile
        if t == a.die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no flush, no close, chunks may be mid-write
    w.close()
    shutdown()


if __name__ == "__main__":
    main()
