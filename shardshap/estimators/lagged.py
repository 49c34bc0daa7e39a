"""adam-lagged (paper B): M = clip * lr (1-b1)/(1-b1^t) / (sqrt(vhat_{t-1}) + eps), the step scale with the
previous second moment held fixed; Adam-family optimizers only. Order 2: h at the real step's midpoint."""
from __future__ import annotations

from ..optim.adam import AdamRule
from .base import Estimator, Frozen, register


@register
class AdamLagged(Estimator):
    name = "adam-lagged"
    needs = "torch.optim.Adam or AdamW (or DeepSpeed's FusedAdam)"

    def supports(self, update_rule) -> bool:
        return isinstance(update_rule, AdamRule)

    def freeze(self, update_rule, shard, clip_factor, dtype, *, order, compiled=False) -> Frozen:
        shift = None
        if order == 2:
            step = update_rule.step_map(shard.value, shard.grad, shard.group, shard.state, dtype, compiled)
            shift = step.midpoint_shift(shard.grad.detach())
        scale = update_rule.lagged_scale(shard.value, shard.group, shard.state, dtype)
        return Frozen(clip_factor * scale, shift)
