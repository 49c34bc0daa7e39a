"""secant: M = -clip * s, with s the secant slope of the optimizer's real update map D(.) (exact for SGD
and momentum, accurate for Adam/AdamW); order 2 takes h at the midpoint of the real step."""
from __future__ import annotations

import torch

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

    def freeze_all(self, update_rule, shards, clip_factor, dtype, *, order, compiled=False) -> dict[int, Frozen]:
        steps = update_rule.step_maps(list(shards.values()), dtype, compiled)
        shifts = [None] * len(steps)
        if order == 2:
            shifts = [s.shift for s in steps]
            grads = [sh.grad for sh in shards.values()]
            todo = [i for i, s in enumerate(steps) if s.shift is None]
            if todo:  # (D(0) + D(G)) / 2, before the slope is scaled
                done = torch._foreach_addcmul(
                    [steps[i].d0 for i in todo], [steps[i].slope for i in todo],
                    [grads[i].detach().to(steps[i].d0.dtype) for i in todo], value=0.5)
                for i, shift in zip(todo, done):
                    shifts[i] = shift
        if steps:
            torch._foreach_mul_([s.slope for s in steps], -clip_factor)  # the slopes are ours: scale in place
        return {pid: Frozen(s.slope, shift) for pid, s, shift in zip(shards, steps, shifts)}

