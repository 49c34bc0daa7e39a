"""secant: M = -clip * s, with s the secant slope of the optimizer's real update map D(.) (exact for SGD
and momentum, accurate for Adam/AdamW); order 2 takes h at the midpoint of the real step."""
from __future__ import annotations

from .base import Estimator, Frozen, register


@register
class Secant(Estimator):
    name = "secant"
    uses_cold_start = True

    def freeze(self, update_rule, shard, clip_factor, dtype, *, order, compiled=False) -> Frozen:
        step = update_rule.step_map(shard.value, shard.grad, shard.group, shard.state, dtype, compiled)
        shift = None
        if order == 2:
            shift = step.midpoint_shift(shard.grad.detach())
        return Frozen(step.slope.mul_(-clip_factor), shift)  # the slope is ours: scale it in place
