"""Estimators: how one optimizer step's Shapley game becomes per-sample products (docs/method.md).

Each estimator reduces the step to a per-coordinate multiplier M and, for order 2, a shift from theta_t
to the point where the target gradient h_k is taken, so that W_k = M * h_k and value_{i,k} = <c g_i, W_k>.
Adding one means a module here with an `Estimator` subclass decorated by `@register`, and its test.
"""
from .base import ESTIMATORS, Estimator, Frozen, get, register

# isort: off
from . import secant, lagged, sgd  # noqa: F401  (registers them, in the order error messages list them)
# isort: on

__all__ = ["ESTIMATORS", "Estimator", "Frozen", "get", "register"]
