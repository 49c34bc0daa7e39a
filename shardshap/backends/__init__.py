"""Training engines the Attributor runs under: one process, or DistributedDataParallel.

Under DDP every rank holds the full parameters and optimizer state, and the gradient reaching the
optimizer is the average over ranks of each rank's gradient. Sample i on rank r therefore contributes
y_i = (its captured local contribution) / world_size to the global gradient, and the Shapley game is
the union of all ranks' samples: a rank's values equal what one process computes for the same global
batch. What is communicated per step: the global sample count, one [params x K] table of per-parameter
sums (the completeness check), and on cold Adam steps the per-coordinate sum of squared per-sample
gradients (one all-reduce the size of the model). Targets are replicated (every rank passes the same
targets; nothing is communicated) or split (each rank passes its share; target gradients are averaged
over ranks).
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Engine:
    """What the Attributor needs to know about the engine that trains the model."""
    model: nn.Module     # what the user's train_loss is called with (the DDP wrapper under DDP)
    module: nn.Module    # the plain module: hooks, parameters, target passes
    world_size: int = 1
    rank: int = 0

    @classmethod
    def detect(cls, model: nn.Module) -> "Engine":
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return cls(model, model.module, dist.get_world_size(), dist.get_rank())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise TypeError(
                "torch.distributed is initialised with several ranks but the model is not wrapped: wrap it in "
                "torch.nn.parallel.DistributedDataParallel (FSDP2 and DeepSpeed engines are not supported yet)")
        return cls(model, model)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def no_sync(self, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on every micro-batch but the last one."""
        if self.distributed and not last_micro_batch:
            return self.model.no_sync()
        return nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


def _free_port() -> int:
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
        port = comm.bcast(_free_port() if comm.rank == 0 else None, root=0)
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


def shutdown() -> None:
    """Leave torch.distributed cleanly: barrier, collect garbage (lets gloo's threads finish before the
    interpreter tears down; without it 5 of 10 runs died with SIGABRT here), then destroy the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
