"""Per-sample sketches of matrix gradients in a subspace of W (schedule="streaming", stream_predictor="subspace").

A matrix parameter's per-sample gradient G_i = sum_t x_t y_t^T (x, y: the rule's token factors) is kept as
its sketch S_i = U^T G_i V ([p, q] per sample, whatever the number of tokens), taken in the backward
against orthonormal bases U ([m, p]) and V ([n, q]) found from the previous step's W. After the backward,
the exact W of the step gives the products <S_i, U^T W_k V> = <G_i, U U^T W_k V V^T>: the projection of
W on the subspace is all that is approximated, and W moves slowly in it from step to step (the targets
are the same). `kept_energy` measures what the projection keeps of the step's W.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .lowrank import _orthonormal, range_finder


@dataclass
class Basis:
    """Orthonormal columns spanning W's columns (U, [m, p]) and rows (V, [n, q]) for a weight [m, n]."""
    U: torch.Tensor
    V: torch.Tensor
    cast: dict = field(default_factory=dict, repr=False, compare=False)  # dtype -> (U, V) in it, made once

    def sides(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) in `dtype` (the sketches' working dtype), cast once: every call of every micro-batch of the
        step sketches against the same basis."""
        if self.U.dtype == dtype:
            return self.U, self.V
        if dtype not in self.cast:
            self.cast[dtype] = (self.U.to(dtype), self.V.to(dtype))
        return self.cast[dtype]

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """[K, p, q] = U^T W_k V for W [K, m, n]."""
        return self.U.T.to(W.dtype) @ W @ self.V.to(W.dtype)

    def dense(self, M: torch.Tensor) -> torch.Tensor:
        """[K, m, n] = U M_k V^T: the projected W the products use."""
        return self.U.to(M.dtype) @ M @ self.V.T.to(M.dtype)


def kept_energy(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """min_k ||U^T W_k V|| / ||W_k|| (1 where W_k = 0): how much of W the projection M keeps."""
    norm = torch.linalg.matrix_norm(W)
    # (kept / norm is NaN where norm = 0, never selected)
    return torch.where(norm > 0, torch.linalg.matrix_norm(M) / norm, 1.0).clamp(max=1.0).min()


def find_basis(W: torch.Tensor, rank: int, omega: Optional[torch.Tensor] = None) -> Basis:
    """Bases spanning every W_k ([K, m, n]) together, `rank` directions per target and side: each target's
    rows from a randomized range finder (lowrank.range_finder: Q_k spans W_k^T Omega), its columns from W_k Q_k
    (aligned with the rows found, better than a second random sketch), side by side over the targets.
    `omega`: range_finder's Omega, given (under torch.func.vmap)."""
    K, m, n = W.shape
    left, Q = range_finder(W, min(rank, m, n), omega=omega)
    rows = Q[0] if K == 1 and K * rank < n else _span(Q.permute(1, 0, 2).reshape(n, -1), K * rank)  # (one Q is
    return Basis(_span(left.permute(1, 0, 2).reshape(m, -1), K * rank), rows)  # orthonormal already) [n, K r]


def _span(Y: torch.Tensor, width: int) -> torch.Tensor:
    """Orthonormal columns spanning Y's ([d, l]); the identity (the whole space: exact whatever W does next)
    when the width asked for, K * rank, reaches d."""
    d = Y.shape[0]
    if width >= d:
        return torch.eye(d, dtype=Y.dtype, device=Y.device)
    return _orthonormal(Y.unsqueeze(0))[0]


def flat_products(S: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """[b, K] = <S_i, M_k> for sketches S [b, p, q] and projected W M [K, p, q] (or per-sample gradients and
    W: any [b, *shape] and [K, *shape])."""
    return S.flatten(1) @ M.to(S.dtype).flatten(1).T


def outer_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[b, p, q] = sum_t x_t y_t^T for x [b, T, p], y [b, T, q]."""
    return torch.bmm(x.transpose(1, 2), y)
