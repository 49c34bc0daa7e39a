"""Ghost (per-sample) products <grad l_i, W> without per-sample gradients, one rule per module kind."""
from ..errors import UnsupportedModule
from . import conv, embedding, linear, norms  # noqa: F401  (register the built-in rules)
from .capture import AttributedModule, Capture, Plan, plan
from .registry import ProductRule, product_rule_for, register

__all__ = ["AttributedModule", "Capture", "Plan", "ProductRule", "UnsupportedModule", "plan", "product_rule_for",
           "register"]
