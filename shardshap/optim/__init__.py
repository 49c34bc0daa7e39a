"""Coordinate-wise update maps D(.) of the supported optimizers, one small module per family."""
from __future__ import annotations

import torch

from ..errors import UnsupportedOptimizer
from .adam import AdamRule
from .base import StepMap, UpdateRule
from .sgd import SGDRule

UPDATE_RULES: dict[type, UpdateRule] = {
    torch.optim.SGD: SGDRule(),
    torch.optim.Adam: AdamRule(decoupled_default=False),
    torch.optim.AdamW: AdamRule(decoupled_default=True),
}


def update_rule_for(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """The update rule of `optimizer`'s exact class; an unknown class is an error, never a fallback."""
    rule = UPDATE_RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{c.__name__}" for c in UPDATE_RULES)
        raise UnsupportedOptimizer(
            f"no update rule for optimizer {type(optimizer).__module__}.{type(optimizer).__qualname__}; "
            f"supported: {supported}. Its update map D(.) is needed to value samples under its real step.")
    rule.check(optimizer)
    return rule


__all__ = ["UPDATE_RULES", "UpdateRule", "StepMap", "UnsupportedOptimizer", "update_rule_for"]
