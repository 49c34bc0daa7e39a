"""Coordinate-wise update maps D(.) of the supported optimizers, one small module per family."""
from __future__ import annotations

import torch

from .adam import AdamRule
from ..errors import UnsupportedOptimizer
from .base import OptimizerRule, StepMap
from .sgd import SGDRule

RULES: dict[type, OptimizerRule] = {
    torch.optim.SGD: SGDRule(),
    torch.optim.Adam: AdamRule(decoupled_default=False),
    torch.optim.AdamW: AdamRule(decoupled_default=True),
}


def rule_for(optimizer: torch.optim.Optimizer) -> OptimizerRule:
    """The update rule of `optimizer`'s exact class; an unknown class is an error, never a fallback."""
    rule = RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{c.__name__}" for c in RULES)
        raise UnsupportedOptimizer(
            f"no update rule for optimizer {type(optimizer).__module__}.{type(optimizer).__qualname__}; "
            f"supported: {supported}. Its update map D(.) is needed to value samples under its real step.")
    rule.check(optimizer)
    return rule


__all__ = ["RULES", "OptimizerRule", "StepMap", "UnsupportedOptimizer", "rule_for"]
