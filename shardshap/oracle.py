"""Ground truth: exact Shapley values of one optimizer step's game, by subset enumeration.

Independent of the ghost machinery: per-sample gradients come from one autograd.grad per sample,
and every coalition S is valued by applying the REAL torch optimizer step, from a copy of the
optimizer state, with gradient c * sum_{i in S} g_i (c = 1/|B| for reduction 'mean'; the clip factor is
frozen at the full batch's value). Exponential cost: for tests and `verify` on small batches only.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .errors import ConfigError
from .target import target_mode as in_target_mode

UTILITIES = ("true", "taylor1", "taylor2")


@dataclass
class OracleResult:
    shapley: torch.Tensor        # [n, K] Shapley values (exact, or Monte Carlo when `exact` is False)
    utility_full: torch.Tensor   # [K] U(B)
    utility_empty: torch.Tensor  # [K] U(empty): what momentum and weight decay alone do
    exact: bool
    evaluations: int

    @property
    def attributable(self) -> torch.Tensor:
        """[K] U(B) - U(empty): what the Shapley values sum to (efficiency)."""
        return self.utility_full - self.utility_empty


def _as_micro(batch):
    return list(batch) if isinstance(batch, list) else [batch]


def shapley(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            train_loss: Callable, target_loss: Callable, batch, targets, *,
            reduction: str = "mean", max_grad_norm: Optional[float] = None, utility: str = "true",
            max_exact: int = 12, permutations: int = 400, seed: int = 0, target_mode: str = "eval") -> OracleResult:
    """Shapley values of U(S) = L_target(theta_t) - L_target(theta(S)) for the samples of `batch`.

    `batch` may be a list of micro-batches (one game over their union). `utility`: 'true' (the real
    one-step game), 'taylor1' / 'taylor2' (the target loss replaced by its first / second-order Taylor
    expansion at theta_t, the step still the real optimizer's). Batches larger than `max_exact` use
    `permutations` antithetic Monte Carlo permutations. `target_mode`: the model's mode while target losses
    are taken (Config.target_mode). Nothing of `model` or `optimizer` is changed.
    """
    if utility not in UTILITIES:
        raise ConfigError(f"utility={utility!r}; choose one of {UTILITIES}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    rng_devices = sorted({p.device.index for p in params if p.device.type == "cuda"})

    with torch.random.fork_rng(devices=rng_devices):
        per_sample = []  # per sample: list over params of its gradient (None where unused)
        for mb in _as_micro(batch):
            losses = train_loss(model, mb)
            for i in range(losses.shape[0]):
                gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
                per_sample.append([None if g is None else g.detach() for g in gs])
    n = len(per_sample)
    c = 1.0 / n if reduction == "mean" else 1.0
    used = [any(s[j] is not None for s in per_sample) for j in range(len(params))]
    stacked = [torch.stack([s[j] if s[j] is not None else torch.zeros_like(params[j]) for s in per_sample])
               if used[j] else None for j in range(len(params))]
    clip = 1.0
    if max_grad_norm is not None:
        full = [c * st.sum(0) for st in stacked if st is not None]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full]))
        clip = float(torch.clamp(max_grad_norm / (total + 1e-6), max=1.0))

    # A private copy of model + optimizer (deep-copied together so the optimizer points at the copy).
    model2, opt2 = copy.deepcopy((model, optimizer))
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    theta0 = [p.detach().clone() for p in params]
    pristine = {id(p2): {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                         for k, v in optimizer.state[p].items()} for p, p2 in zip(params, params2)
                if p in optimizer.state}

    def stepped_params(mask: int):
        """theta(S) - theta_t for the coalition encoded by the bits of `mask`."""
        members = [i for i in range(n) if mask >> i & 1]
        opt2.state.clear()
        for p2 in params2:
            if id(p2) in pristine:
                opt2.state[p2] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                  for k, v in pristine[id(p2)].items()}
        with torch.no_grad():
            for j, (p2, t0) in enumerate(zip(params2, theta0)):
                p2.copy_(t0)
                if stacked[j] is None:
                    p2.grad = None
                else:
                    g = stacked[j][members].sum(0) if members else torch.zeros_like(t0)
                    p2.grad = (clip * c) * g
        opt2.step()
        return [p2.detach() - t0 for p2, t0 in zip(params2, theta0)]

    def targets_of(m):
        with in_target_mode(m, target_mode):
            return target_loss(m, targets).reshape(-1)

    with torch.random.fork_rng(devices=rng_devices):
        base = targets_of(model).detach()
    K = base.numel()
    if utility != "true":
        with torch.random.fork_rng(devices=rng_devices):
            value = targets_of(model)
            h = [torch.autograd.grad(value[k], params, retain_graph=True, allow_unused=True,
                                     create_graph=utility == "taylor2") for k in range(K)]

    def evaluate(mask: int) -> np.ndarray:
        delta = stepped_params(mask)
        if utility == "true":
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                return (base - targets_of(model2).detach()).double().cpu().numpy()
        out = np.zeros(K)
        for k in range(K):
            first = sum((g * d).sum() for g, d in zip(h[k], delta) if g is not None)
            u = -float(first.detach())
            if utility == "taylor2":
                hv = torch.autograd.grad(first, params, retain_graph=True, allow_unused=True)
                u -= 0.5 * float(sum((v * d).sum() for v, d in zip(hv, delta) if v is not None))
            out[k] = u
        return out

    cache: dict[int, np.ndarray] = {}

    def U(mask: int) -> np.ndarray:
        if mask not in cache:
            cache[mask] = evaluate(mask)
        return cache[mask]

    full_mask = (1 << n) - 1
    if n <= max_exact:
        masks = np.arange(1 << n)
        table = np.stack([U(int(m)) for m in masks])  # [2^n, K]
        pop = np.array([bin(int(m)).count("1") for m in masks])
        weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
        phi = np.zeros((n, K))
        for i in range(n):
            without = masks[(masks >> i & 1) == 0]
            phi[i] = (weight[pop[without]][:, None] * (table[without | (1 << i)] - table[without])).sum(0)
        exact = True
    else:
        gen = np.random.default_rng(seed)
        phi = np.zeros((n, K))
        count = 0
        for _ in range(max(1, permutations // 2)):
            perm = gen.permutation(n)
            for order in (perm, perm[::-1]):  # antithetic pair: lower variance
                mask, prev = 0, U(0)
                for i in order:
                    mask |= 1 << int(i)
                    cur = U(mask)
                    phi[i] += cur - prev
                    prev = cur
                count += 1
        phi /= count
        exact = False
    as_t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)
    return OracleResult(shapley=as_t(phi), utility_full=as_t(U(full_mask)),
                        utility_empty=as_t(U(0)), exact=exact, evaluations=len(cache))
