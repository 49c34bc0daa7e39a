"""Joining the ranks a launcher started (torchrun, deepspeed, mpiexec) and leaving them cleanly."""
from __future__ import annotations

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise torch.distributed from whichever launcher started this process; returns (rank, world).

    torchrun / deepspeed set RANK and WORLD_SIZE; under `mpiexec -n N` the ranks come from mpi4py and
    rank 0 broadcasts a free port. Single process: nothing to do. Backend: nccl on GPUs, gloo otherwise.
    A collective that waits longer than `timeout_s` raises instead of hanging.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and any(k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        port = comm.bcast(free_port() if comm.rank == 0 else None, root=0)
        os.environ.update(RANK=str(comm.rank), WORLD_SIZE=str(comm.size), LOCAL_RANK=str(comm.rank),
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    if "RANK" not in os.environ:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank of the world (launch scripts: checkpoints); nothing to do in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def world_sum(value: float) -> float:
    """`value` summed over every rank of the world (launch scripts); itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)  # (NCCL takes CUDA tensors only)
    dist.all_reduce(t)
    return float(t.item())


def shutdown() -> None:
    """Leave torch.distributed cleanly: barrier, collect garbage (lets gloo's threads finish before the
    interpreter tears down; without it half the runs died with SIGABRT here), then destroy the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
