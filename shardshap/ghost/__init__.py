"""Ghost (per-sample) products <grad l_i, W> without per-sample gradients, one rule per module kind."""
from . import conv, embedding, linear, norms  # noqa: F401  (register the built-in rules)
from ..errors import UnsupportedModule
from .capture import AttributedModule, Capture, Plan, plan
from .registry import ProductRule, register, product_rule_for

__all__ = ["AttributedModule", "Capture", "Plan", "ProductRule", "UnsupportedModule", "plan", "register", "product_rule_for"]
