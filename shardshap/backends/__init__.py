"""Training engines the Attributor runs under, each behind the `Backend` contract (backends/base.py):
one process and DDP (local.py), DTensor parameters: FSDP2, HSDP, tensor parallelism (dtensor.py), DeepSpeed
ZeRO-1/2/3 (deepspeed.py)."""
from __future__ import annotations

import sys

import torch.distributed as dist
from torch import nn

from ..errors import UnsupportedEngine
from .base import Backend, OwnedSlice
from .launch import barrier, free_port, init_distributed, shutdown, world_sum
from .local import DDPBackend, LocalBackend


def _is_deepspeed_engine(model) -> bool:
    if "deepspeed" not in sys.modules:  # a DeepSpeed engine exists only once deepspeed was imported
        return False
    from deepspeed.runtime.engine import DeepSpeedEngine
    return isinstance(model, DeepSpeedEngine)  # subclasses too (e.g. the pipeline engine)


def detect(model: nn.Module) -> Backend:
    """The backend for the way `model` is trained (by type, subclasses included)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPBackend(model)
    if _is_deepspeed_engine(model):
        from .deepspeed import ZeroBackend
        return ZeroBackend(model)
    from .dtensor import DTensorBackend
    if DTensorBackend.owns(model):
        return DTensorBackend(model)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise UnsupportedEngine(
            "torch.distributed is initialised with several ranks but the model is not wrapped: wrap it in "
            "torch.nn.parallel.DistributedDataParallel, shard it with torch.distributed.fsdp.fully_shard or split it "
            "with torch.distributed.tensor.parallel.parallelize_module")
    return LocalBackend(model)


__all__ = ["Backend", "DDPBackend", "LocalBackend", "OwnedSlice", "barrier", "detect", "free_port",
           "init_distributed", "shutdown", "world_sum"]
