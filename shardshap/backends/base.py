"""`Backend`: everything the Attributor needs from the engine that trains the model.

A backend knows which elements of every parameter this rank owns (`shards`), how the engine clips,
how to take target gradients without touching `.grad`, how to move parameters to the midpoint and
back (`shifted`), and how to talk to the other ranks. Every collective shardshap issues goes through
the methods of the "communication" section, on a named process group and on the group's device
(CUDA under NCCL), so that adding a backend never means finding raw `torch.distributed` calls.

Process groups, by the name the collectives take (`over=`):
- "dp" (`dp_group` / `dp_size` / `dp_rank`): the data-parallel group, whose ranks see different samples.
  Each sample's share of the gradient is 1/dp_size of its local contribution (the engines average).
- "shard": the data-parallel ranks over which parameters are partitioned (the dp group itself, except under
  HSDP, where it is the shard dimension of the data-parallel mesh).
- "mp": the model-parallel group (tensor/sequence parallel), whose ranks see the same samples and hold
  parts of each layer. None: no model parallelism.
A backend with a process group takes the collective code paths even when the group has one rank, so
that a one-GPU NCCL run exercises them; only the single-process backend (no group) skips them.

Every method that communicates is called by every rank of the group in the same order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UnsupportedEngine


@dataclass
class OwnedSlice:
    """The elements of one optimizer parameter that this rank owns, as flat (1-D) views.

    Local and DDP training own every element; FSDP2 and ZeRO own a contiguous range of the flattened
    parameter. The estimators' math is coordinate-wise, so it runs on these views unchanged.
    """
    param: nn.Parameter   # the registered parameter (the key of the attribution plan)
    value: torch.Tensor   # writable view of the owned elements (the values the optimizer updates)
    grad: Optional[torch.Tensor]  # the owned elements of the gradient the optimizer receives
    state: dict           # optimizer state of the owned elements (tensors flat; scalars as they are)
    group: dict           # the parameter group's hyperparameters
    start: int = 0        # offset of the owned range in the flattened full_shape
    counted: bool = True  # the owned elements count in sums over ranks (False where another model-parallel
    #                       rank holds the same replicated copy and counts it)


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class Backend(ABC):
    """The contract every training engine implements (see the module docstring).

    Capability flags:
    - `partitioned`: gradients and optimizer state are split across the data-parallel ranks, so partial
      results computed on owned elements must be summed over the group (`reduce_partial`).
    - `owns_backward`: only the engine may run backward, clipping and the optimizer step; the
      low-level `record`/`attribute` API cannot drive it.
    - `supports_hvp`: target gradients can be differentiated twice (curvature='hvp').
    """

    partitioned: bool = False
    partition_spans_mp: bool = False  # the "shard" group holds the model-parallel ranks too (DeepSpeed-Ulysses)
    owns_backward: bool = False
    supports_hvp: bool = False

    def __init__(self, model: nn.Module, module: nn.Module, dp_group: Optional[dist.ProcessGroup] = None):
        self.model, self.module = model, module
        self.distributed = dp_group is not None
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if self.distributed else 1
        self.dp_rank = dist.get_rank(dp_group) if self.distributed else 0
        self.shard_group = dp_group
        self.mp_group: Optional[dist.ProcessGroup] = None
        self.mp_size, self.mp_rank = 1, 0
        self.comm_device = _communication_device(dp_group) if self.distributed else torch.device("cpu")
        self.bytes_sent = 0  # payload of shardshap's own collectives on this rank (reported per step)
        self.bytes_sent_mp = 0  # the part of it sent over the model-parallel group
        self.collective_log: Optional[list] = None  # set to [] to record (op, shape, dtype) of each collective

    # ---------------------------------------------------------------- training (engine defaults: torch)
    def resolve_optimizer(self, optimizer):
        """The optimizer that steps (DeepSpeed: taken from the engine when None is passed)."""
        if optimizer is None:
            raise UnsupportedEngine("pass the torch optimizer that trains the model (None is only for DeepSpeed "
                                    "engines, which own theirs)")
        return optimizer

    def update_rule(self, optimizer):
        """The optimizer's coordinate-wise update rule (shardshap.optim)."""
        from ..optim import update_rule_for
        return update_rule_for(optimizer)

    def trainable(self, optimizer) -> set[int]:
        """ids of the model parameters the optimizer updates."""
        return {id(p) for g in optimizer.param_groups for p in g["params"]}

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def check_before_step(self) -> None:  # noqa: B027  (a hook with nothing to do by default)
        """Raise when the low-level API's attribute() is not called where the engine's next step applies the
        gradients (DeepSpeed: the accumulation boundary)."""

    def after_micro_batch(self, last: bool) -> None:  # noqa: B027  (a hook with nothing to do by default)
        """Called after each micro-batch's backward (DeepSpeed counts micro-steps here)."""

    def optimizer_step(self, optimizer) -> None:
        optimizer.step()

    def no_sync(self, last_micro_batch: bool):
        """A context that skips the engine's gradient synchronisation on all but the last micro-batch."""
        return nullcontext()

    def model_parallel(self):
        """The tensor-parallel layout the products need (ghost.parallel.ModelParallel), or None."""
        return None

    # ---------------------------------------------------------------- parameters
    @abstractmethod
    def shards(self, optimizer, grads: bool = True) -> dict[int, OwnedSlice]:
        """id(param) -> OwnedSlice, for every optimizer parameter that has a gradient this step. Across the
        data-parallel ranks the owned ranges of a parameter cover each of its elements exactly once.
        `grads=False` (before the backward, streaming schedule): every trainable optimizer parameter, with
        `grad` None."""

    @staticmethod
    def _covered(optimizer, grads: bool):
        """(parameter group, parameter) of every optimizer parameter `shards` covers: those with a gradient this
        step, or (grads=False) every trainable one."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if (p.grad is not None) if grads else p.requires_grad:
                    yield group, p

    def in_model_order(self, shards: dict[int, OwnedSlice]) -> list[nn.Parameter]:
        """The parameters of `shards` in the model's order, as clip_grad_norm_(model.parameters()) sums them
        (optimizers often group parameters in another order, and the norm's rounding depends on it), then any
        the optimizer holds apart from the model."""
        in_model = {id(p): p for p in self.module.parameters()}
        return [p for p in in_model.values() if id(p) in shards] + [
            sh.param for pid, sh in shards.items() if pid not in in_model]

    @abstractmethod
    def clip(self, shards: dict[int, OwnedSlice], max_norm: Optional[float]) -> float | torch.Tensor:
        """Scale the owned gradients by the factor the engine's own clipping applies this step (the
        engine's norm, its formula); return the factor (1.0 when max_norm is None), as a number or as a 0-d
        tensor on the device (not read back there)."""

    @abstractmethod
    def target_gradients(self, evaluate, params: list[nn.Parameter], dtype, split: bool = False
                         ) -> tuple[list, torch.Tensor]:
        """Gradients of each target loss, [K, owned numel] per parameter (None where no target depends on
        it), and the losses [K]. `evaluate()` runs the target forward; `.grad` is left untouched. `split`:
        each rank evaluated its share of the targets, so gradients and losses are averaged over ranks."""

    @abstractmethod
    def gather(self, shard: OwnedSlice, owned: torch.Tensor) -> torch.Tensor:
        """[K, owned numel] -> [K, *param full shape], the same on every rank."""

    def owned(self, shard: OwnedSlice, full: torch.Tensor, lead: int = 0) -> torch.Tensor:
        """The owned elements of a full-shape tensor (flat), as a view; `lead` leading dimensions (e.g. the
        K targets of W [K, *shape]) are kept."""
        return full.reshape(*full.shape[:lead], -1).narrow(-1, shard.start, shard.value.numel())

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        """The parameter's real shape (ZeRO-3 leaves an empty placeholder in param.shape)."""
        return param.shape

    @contextmanager
    def gradients_set_aside(self) -> Iterator[list]:
        """Inside: `.grad` is None on every parameter of the module, for a target pass that backpropagates
        into `.grad`; afterwards the training gradients are put back untouched. Yields the parameters (to
        clear their `.grad` between targets)."""
        everything = list(self.module.parameters())
        saved = [p.grad for p in everything]
        for p in everything:
            p.grad = None
        try:
            yield everything
        finally:
            for p, g in zip(everything, saved):
                p.grad = g

    @contextmanager
    def shifted(self, shards: dict[int, OwnedSlice], shifts: Optional[dict[int, torch.Tensor]]) -> Iterator[None]:
        """Inside the block the model computes at theta + shift (per owned element); on exit every value is
        restored bit-exactly, also on error. `shifts=None`: the parameters as they are."""
        if shifts is None or not shards:
            yield
            return
        values = [sh.value for sh in shards.values()]
        with torch.no_grad():  # (foreach: a few kernels for all parameters, not one per parameter)
            saved = torch._foreach_clone(values)
        try:
            with torch.no_grad():
                torch._foreach_add_(values, [shifts[pid].to(v.dtype) for pid, v in zip(shards, values)])
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(values, saved)

    # ---------------------------------------------------------------- communication
    def _run(self, name: str, tensor: torch.Tensor, collective, sends: bool = True, share: float = 1.0):
        """Run `collective(t)` on `tensor` moved to the communication device and count what this rank `sends`
        (nothing in a group of one rank; `share` of `tensor` where the rest stays on the rank).
        A collective that works in place returns `t`: the result then lands in `tensor` itself; one that
        returns a list of tensors gets them back on `tensor`'s device."""
        if self.collective_log is not None:
            self.collective_log.append((name, tuple(tensor.shape), str(tensor.dtype)))
        if sends:
            payload = int(tensor.numel() * tensor.element_size() * share)
            self.bytes_sent += payload
            if name.endswith("_mp"):
                self.bytes_sent_mp += payload
        if tensor.device == self.comm_device:
            return collective(tensor)
        out = collective(tensor.to(self.comm_device))
        return tensor.copy_(out) if torch.is_tensor(out) else [o.to(tensor.device) for o in out]

    def _group(self, over: str) -> Optional[dist.ProcessGroup]:
        return {"dp": self.dp_group, "shard": self.shard_group, "mp": self.mp_group}[over]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", over: str = "dp") -> torch.Tensor:
        """Reduce `tensor` in place over a process group ('sum' or 'max'); returns it."""
        group = self._group(over)
        if group is None:
            return tensor

        def reduce(t):
            dist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
            return t
        return self._run(f"all_reduce_{op}" + ("" if over == "dp" else f"_{over}"), tensor, reduce,
                         sends=dist.get_world_size(group) > 1)

    def all_ok(self, ok: bool, over: str = "dp") -> bool:
        """True when `ok` on every rank of a process group (one all-reduce): lets every rank stop together when one
        refuses."""
        return int(self.all_reduce(torch.tensor([0 if ok else 1], dtype=torch.int32), "max", over).item()) == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(tensor, "sum")

    def reduce_partial(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum partial results computed on owned elements over the ranks that own different elements (a no-op
        where every rank owns everything). Terms of OwnedSlices that are not `counted` must be left out."""
        if self.partitioned:
            self.all_reduce(tensor, over="shard")
        return tensor if self.partition_spans_mp else self.all_reduce(tensor, over="mp")

    def all_gather(self, tensor: torch.Tensor, over: str = "dp") -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on every rank) of a process group, in rank order."""
        group = self._group(over)
        if group is None:
            return [tensor]

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            return parts
        return self._run("all_gather" + ("" if over == "dp" else f"_{over}"), tensor, gather,
                         sends=dist.get_world_size(group) > 1)

    def reduce_scatter(self, parts: list[torch.Tensor], over: str = "dp") -> torch.Tensor:
        """The sum over the ranks of a process group of their `parts[i]` (same shapes on every rank), on rank i."""
        group = self._group(over)
        if group is None:
            return parts[0]

        def scatter(t):
            out = torch.empty_like(t[0])
            dist.reduce_scatter(out, list(t.unbind(0)), group=group)
            return [out]
        size = dist.get_world_size(group)
        return self._run("reduce_scatter" + ("" if over == "dp" else f"_{over}"), torch.stack(parts), scatter,
                         sends=size > 1, share=(size - 1) / size)[0]  # (the rank's own part stays)

    def broadcast(self, tensor: torch.Tensor, src: int, over: str = "dp") -> torch.Tensor:
        """`tensor` of rank `src` of a process group on every rank of it (in place)."""
        group = self._group(over)
        if group is None:
            return tensor

        def send(t):
            dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
            return t
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return self._run("broadcast" + ("" if over == "dp" else f"_{over}"), tensor, send,
                         sends=rank == src and size > 1)

    def all_gather_object(self, obj, over: str = "dp") -> list:
        """Every rank's picklable `obj` of a process group (setup only, never per step)."""
        group = self._group(over)
        if group is None:
            return [obj]
        if self.collective_log is not None:
            self.collective_log.append(("all_gather_object", (), type(obj).__name__))
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            if self.collective_log is not None:
                self.collective_log.append(("barrier", (), ""))
            dist.barrier(group=self.dp_group)


def _communication_device(group) -> torch.device:
    """NCCL groups take CUDA tensors only; every other backend here (gloo, mpi) takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
