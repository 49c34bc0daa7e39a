"""The estimators of DESIGN 2.2. Each reduces one step's game to a per-coordinate multiplier M and a
point at which to take the target gradient h_k, so that W_k = M * h_k and value_{i,k} = <c g_i, W_k>.

- secant:      M = -kappa * s, with s the secant slope of the real update map D(.)
- adam-lagged: M = kappa * lr (1-b1)/(1-b1^t) / (sqrt(vhat_{t-1}) + eps)      (paper B)
- sgd:         M = kappa * lr                                                    (paper A)
Order 1 takes h at theta_t; order 2 at the midpoint of the modelled step (the real step for secant
and adam-lagged, a plain SGD step for sgd), or at theta_t plus an exact Hessian-vector product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .optim import OptimizerRule
from .optim.base import scalar

ESTIMATORS = ("secant", "adam-lagged", "sgd")


@dataclass
class Frozen:
    """What an estimator fixes for one parameter and one step."""
    multiplier: torch.Tensor            # M, shape of the parameter (compute dtype)
    shift: Optional[torch.Tensor]       # theta_mid - theta_t (None for order 1)


def freeze(estimator: str, order: int, rule: OptimizerRule, param: torch.Tensor, grad: torch.Tensor,
           group: dict, state: dict, clip_factor: float, dtype: torch.dtype) -> Frozen:
    """`grad` is the (clipped) gradient the optimizer is about to receive."""
    if estimator == "sgd":
        lr = scalar(group["lr"])
        shift = -0.5 * lr * grad.detach().to(dtype) if order == 2 else None
        return Frozen(torch.full_like(param, clip_factor * lr, dtype=dtype), shift)
    step = rule.step_map(param, grad, group, state, dtype)
    shift = step.midpoint(grad.detach().to(dtype)) if order == 2 else None
    if estimator == "secant":
        return Frozen(-clip_factor * step.slope, shift)
    if estimator == "adam-lagged":
        return Frozen(clip_factor * rule.lagged_scale(param, group, state, dtype), shift)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
