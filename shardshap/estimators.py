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

import numpy as np

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
           group: dict, state: dict, clip_factor: float, dtype: torch.dtype, compiled: bool = False) -> Frozen:
    """`grad` is the (clipped) gradient the optimizer is about to receive; `compiled`: Config.compile_math."""
    if estimator == "sgd":
        lr = scalar(group["lr"])
        shift = -0.5 * lr * grad.detach().to(dtype) if order == 2 else None
        return Frozen(torch.full_like(param, clip_factor * lr, dtype=dtype), shift)
    step = rule.step_map(param, grad, group, state, dtype, compiled)
    shift = None
    if order == 2:
        shift = step.shift if step.shift is not None else step.midpoint(grad.detach().to(dtype))
    if estimator == "secant":
        return Frozen(step.slope.mul_(-clip_factor), shift)  # the slope is ours: scale it in place
    if estimator == "adam-lagged":
        return Frozen(clip_factor * rule.lagged_scale(param, group, state, dtype), shift)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


def _nodes(count: int):
    """Quadrature for the Owen integral: q = sin^2(pi u / 2) on Gauss-Legendre nodes in u (removes the
    1/sqrt(q(1-q)) endpoint behaviour), and probabilists' Gauss-Hermite nodes for a standard normal."""
    u, wu = np.polynomial.legendre.leggauss(count)
    u, wu = (u + 1) / 2, wu / 2
    q = np.sin(np.pi * u / 2) ** 2
    wq = wu * (np.pi / 2) * np.sin(np.pi * u)
    z, wz = np.polynomial.hermite_e.hermegauss(count)
    return q, wq, z, wz / wz.sum()


def owen_multiplier(displacement, grad: torch.Tensor, sum_sq: torch.Tensor, n: int, clip_factor: float,
                    nodes: int = 8) -> torch.Tensor:
    """Cold-start multiplier M = -c (DESIGN 2.6, research/calibration.md Q2, 'owen-stein').

    Owen's multilinear extension of the per-coordinate game G -> D(G): c is E_q E_Y[F'(Y)] with
    F(G) = D(clip * G), Y the gradient of a random coalition with q-Bernoulli membership plus the sample,
    modelled as a Gaussian; E[F'(Y)] = E[F(Y) Z] / sd by Stein's lemma, on the TRUE update map.
    `grad` = sum_i y_i and `sum_sq` = sum_i y_i^2 over the per-sample contributions y_i (unclipped).
    """
    q, wq, z, wz = _nodes(nodes)
    mean_y = grad / n
    var_y = (sum_sq / n - mean_y ** 2).clamp_min(0)
    F = lambda g: displacement(clip_factor * g)
    c = torch.zeros_like(grad)
    for qj, wqj in zip(q.tolist(), wq.tolist()):
        mu = mean_y * (qj * (n - 1) + 1)
        sd = (qj * (1 - qj) * (n - 1) / n * sum_sq + var_y).sqrt()
        safe = torch.where(sd > 0, sd, torch.ones_like(sd))
        base = F(mu)
        stein = sum(wk * zk * (F(mu + safe * zk) - base) for zk, wk in zip(z.tolist(), wz.tolist())) / safe
        c += wqj * stein
    return -c
