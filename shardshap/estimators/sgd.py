"""sgd (paper A): M = clip * lr whatever the optimizer; order 2 takes h at the midpoint of a plain SGD step."""
from __future__ import annotations

import torch

from ..optim.base import scalar
from .base import Estimator, Frozen, register


@register
class SGDProxy(Estimator):
    name = "sgd"

    def freeze(self, update_rule, shard, clip_factor, dtype, *, order, compiled=False) -> Frozen:
        lr = scalar(shard.group["lr"])
        shift = -0.5 * lr * shard.grad.detach().to(dtype) if order == 2 else None
        return Frozen(torch.full_like(shard.value, lr, dtype=dtype).mul_(clip_factor), shift)  # (a tensor clip too)
