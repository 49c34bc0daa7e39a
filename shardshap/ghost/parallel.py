"""What the per-sample products need to know of tensor (and sequence) parallelism.

Under tensor parallelism a rank holds a slice of some weights and of the activations that meet them, so it
computes a part of each sample's product; the parts are summed over the model-parallel ranks (only the
[players, K] products travel). A module call's part is partial when its parameter is split over those ranks
(`splits`), or when its captures are split along the tokens (sequence parallelism: each rank sums over its
own tokens). A part that is whole on every rank (a replicated bias) is counted on model-parallel rank 0 only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UnsupportedModule


@dataclass
class ModelParallel:
    rank: int
    sum: Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over the model-parallel ranks (a collective)
    # id(param) -> (dim, start, length): this rank's slice of a parameter split over the model-parallel ranks
    splits: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    # every capture and per-sample loss holds this rank's tokens only (DeepSpeed-Ulysses: plain tensors, no layout)
    tokens_split: bool = False

    def partial(self, pid: int, token_split: bool) -> bool:
        """Whether this rank's part of a call's products for the parameter is summed over the ranks."""
        return token_split or pid in self.splits

    def contributes(self, pid: int, token_split: bool) -> bool:
        return self.rank == 0 or self.partial(pid, token_split)


def local_capture(x, name: str) -> tuple[torch.Tensor, bool]:
    """(this rank's local tensor, whether it is split along a token dimension) of a captured input or output
    gradient; plain tensors are whole."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(x, DTensor):
        return x, False
    token_split = False
    for placement in x.placements:
        if placement.is_partial():
            raise UnsupportedModule(
                f"module {name!r} sees a Partial DTensor (a sum still pending over the model-parallel ranks) as its "
                "input or output gradient; per-sample products need whole or sharded activations. Redistribute it "
                "before the module (e.g. a RowwiseParallel producer with output_layouts=Replicate() or Shard(1)).")
        if isinstance(placement, Shard):
            dim = placement.dim % x.dim()
            if dim == 0:
                raise UnsupportedModule(f"module {name!r} sees activations sharded along the batch (Shard(0)); "
                                        "shard the batch with data parallelism, not with DTensor placements")
            token_split = token_split or dim < x.dim() - 1
    return x.to_local(), token_split
