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
class Shard:
    """The elements of one optimizer parameter that this rank owns, as flat (1-D) views.

    Local and DDP training own every element; FSDP2 and ZeRO own a contiguous range of the flattened
    parameter. The estimators' math is coordinate-wise, so it runs on these views unchanged.
    """
    param: nn.Parameter   # the registered parameter (the key of the attribution plan)
    value: torch.Tensor   # writable view of the owned elements
    grad: torch.Tensor    # the owned elements of the gradient the optimizer receives
    state: dict           # optimizer state of the owned elements (tensors flat; scalars as they are)
    group: dict           # the parameter group's hyperparameters
    start: int = 0        # offset of the owned range in param.flatten()


class Engine:
    """What the Attributor needs from the engine that trains the model (one process here; subclasses
    for DDP, FSDP2, DeepSpeed). Every method with a collective is called by every rank in the same order."""

    partitioned = False  # True when gradients and optimizer state are split across ranks
    owns_backward = False  # True when only the engine may run backward/step (the low-level API cannot)

    def __init__(self, model: nn.Module, module: nn.Module, world_size: int = 1, rank: int = 0):
        self.model, self.module, self.world_size, self.rank = model, module, world_size, rank
        self.bytes_sent = 0  # payload of shardshap's own collectives on this rank (reported per step)

    @classmethod
    def detect(cls, model: nn.Module) -> "Engine":
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return Engine(model, model.module, dist.get_world_size(), dist.get_rank())
        if type(model).__name__ == "DeepSpeedEngine":
            from .deepspeed import DeepSpeedEngine
            return DeepSpeedEngine(model)
        from .fsdp import FSDP2Engine
        if FSDP2Engine.owns(model):
            return FSDP2Engine(model)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise TypeError(
                "torch.distributed is initialised with several ranks but the model is not wrapped: wrap it in "
                "torch.nn.parallel.DistributedDataParallel or shard it with "
                "torch.distributed.fsdp.fully_shard")
        return Engine(model, model)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---------------------------------------------------------------- training
    def resolve_optimizer(self, optimizer):
        """The optimizer that steps (DeepSpeed: taken from the engine when None is passed)."""
        if optimizer is None:
            raise TypeError("pass the torch optimizer that trains the model (None is only for DeepSpeed "
                            "engines, which own theirs)")
        return optimizer

    def update_rule(self, optimizer):
        from ..optim import rule_for
        return rule_for(optimizer)

    def trainable(self, optimizer) -> set[int]:
        """ids of the model parameters the optimizer updates."""
        return {id(p) for g in optimizer.param_groups for p in g["params"]}

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def after_micro_batch(self, last: bool) -> None:
        """Called after each micro-batch's backward (DeepSpeed counts micro-steps here)."""

    def optimizer_step(self, optimizer) -> None:
        optimizer.step()

    def no_sync(self, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on every micro-batch but the last one."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not last_micro_batch:
            return self.model.no_sync()
        return nullcontext()

    def shards(self, optimizer) -> dict[int, Shard]:
        """id(param) -> Shard, for every optimizer parameter that has a gradient this step."""
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = {k: (v.view(-1) if torch.is_tensor(v) and v.shape == p.shape else v)
                         for k, v in optimizer.state.get(p, {}).items()}
                out[id(p)] = Shard(p, p.detach().view(-1), p.grad.view(-1), state, group)
        return out

    def clip(self, shards: dict[int, Shard], max_norm) -> float:
        """Clip like torch.nn.utils.clip_grad_norm_ (global L2 norm); returns the clip factor (1.0 when
        max_norm is None)."""
        if max_norm is None:
            return 1.0
        # in the model's parameter order, as clip_grad_norm_(model.parameters()) sums (optimizers often
        # group parameters in another order, and the norm's rounding depends on it)
        in_model = {id(p): p for p in self.module.parameters()}
        params = [p for p in in_model.values() if id(p) in shards] + [  # then any the optimizer holds apart
            sh.param for pid, sh in shards.items() if pid not in in_model]
        params = [p for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        factor = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return factor

    def target_gradients(self, evaluate, params: list[nn.Parameter], dtype, split: bool = False
                         ) -> tuple[list, torch.Tensor]:
        """Gradients of each target loss, [K, owned numel] per parameter (None where no target depends on
        it), and the losses [K]. `evaluate()` runs the target forward; .grad is never touched. `split`:
        each rank evaluated its share of the targets, so gradients and losses are averaged over ranks."""
        value = evaluate()
        grads = [[] for _ in params]
        for k in range(value.numel()):
            gk = torch.autograd.grad(value[k], params, retain_graph=k < value.numel() - 1, allow_unused=True)
            for acc, g in zip(grads, gk):
                acc.append(None if g is None else g.detach().to(dtype).reshape(-1))
        h = [None if any(x is None for x in g) else g[0].unsqueeze(0) if len(g) == 1 else torch.stack(g)
             for g in grads]  # one target: a view, not a copy of every gradient
        value = value.detach()
        if split and self.distributed:
            h = [self.all_reduce_sum(torch.zeros(value.numel(), p.numel(), dtype=dtype, device=p.device)
                                     if x is None else x) / self.world_size for x, p in zip(h, params)]
            value = self.all_reduce_sum(value.clone()) / self.world_size
        return h, value

    # ---------------------------------------------------------------- communication
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
            self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def reduce_partial(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum partial results computed on owned elements (a no-op where every rank owns everything)."""
        return self.all_reduce_sum(tensor) if self.partitioned else tensor

    def gather(self, shard: Shard, owned: torch.Tensor) -> torch.Tensor:
        """[K, owned numel] -> [K, *param.shape] on every rank."""
        return owned.reshape(owned.shape[0], *shard.param.shape)

    def owned(self, shard: Shard, full: torch.Tensor, lead: int = 0) -> torch.Tensor:
        """The owned elements of a full-shape tensor (flat), as a view; `lead` leading dimensions (e.g. the
        K targets of W [K, *shape]) are kept."""
        return full.reshape(*full.shape[:lead], -1).narrow(-1, shard.start, shard.value.numel())


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
