"""The Owen cold start: on the first steps of Adam/AdamW (state near zero, update close to lr*sign(g),
where the secant slope is ill-conditioned) M comes from Owen's multilinear extension of the true
per-coordinate update map, with Gaussian coalition sums (docs/method.md, "Cold start")."""
from __future__ import annotations

import numpy as np
import torch


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
    """Cold-start multiplier M = -c (the "owen-stein" form).

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


def is_cold(update_rule, shard, cold_steps: int) -> bool:
    """Whether this parameter's step is among the first `cold_steps` of its optimizer state."""
    t = update_rule.step_number(shard.state)
    return t is not None and t <= cold_steps


def owen_cold_start(backend, capture, update_rule, shards, frozen, cold, clip, dtype):
    """Replace the secant multiplier of the cold parameters `cold` ([(param, h)]) by Owen's, in `frozen`;
    returns the per-sample offset [K] that keeps the values' sum equal to the secant's (efficiency).
    Every rank runs this in the same parameter order (collectives inside)."""
    n = int(backend.all_reduce_sum(torch.tensor([capture.players.n], dtype=torch.int64)).item())
    sum_sq = capture.sum_of_squares({id(p) for p, _ in cold}, dtype)
    offset = torch.zeros(cold[0][1].shape[0], dtype=dtype, device=cold[0][1].device)
    for p, hp in cold:
        sh = shards[id(p)]
        full = sum_sq.get(id(p), torch.zeros(backend.full_shape(p), dtype=dtype, device=hp.device))
        if backend.distributed:  # each rank's samples are its own players: add their squares up
            full = backend.all_reduce_sum(full / backend.dp_size ** 2)
        grad = sh.grad.to(dtype) / clip  # sum of the per-sample contributions, before clipping
        owen = owen_multiplier(update_rule.displacement_fn(sh.value, sh.group, sh.state, dtype),
                               grad, backend.owned(sh, full), n, clip)
        if sh.counted:  # (another model-parallel rank counts its copy)
            offset = offset + ((frozen[id(p)].multiplier - owen) * grad).unsqueeze(0).mul(hp).sum(1)
        frozen[id(p)].multiplier = owen
    return backend.reduce_partial(offset) / n
