"""Low-rank products for matrix weights (Config.product_rank).

Each matrix weight's product vector W_k ([d_out, d_in]) is replaced by W_k Q Q^T, its projection on an
r-dimensional row subspace found by a randomized range finder (Q spans W_k^T Omega for a Gaussian
Omega), computed once per step. Then
    sum_t e_t^T W_k a_t ~ sum_t (Q^T W_k^T e_t) . (Q^T a_t)
costs tokens * r * (d_in + d_out) instead of tokens * d_in * d_out. W_k is very low rank in practice,
so a plain sketch (no power iterations, no oversampling) suffices; docs/benchmarks.md has its fidelity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MIN_ENERGY = 0.95  # below this kept energy ||W_r|| / ||W||, a layer falls back to exact products
POWER_ITERS = 0   # rounds of W^T W: each costs two more GEMMs per layer; R did not need them (W1)
SEED = 0x5EED  # a private generator: the sketch never touches training's random numbers


@dataclass
class Factors:
    """W_k ~ left[k] @ right[k] for a weight seen as [K, d_out, d_in]."""
    left: torch.Tensor    # [K, d_out, r]: W_k Q
    right: torch.Tensor   # [K, r, d_in]: Q^T (orthonormal rows; zero rows where W_k has lower rank)
    energy: torch.Tensor  # [K]: ||W_r,k||_F / ||W_k||_F (1 where W_k = 0)

    def dense(self) -> torch.Tensor:
        """[K, d_out, d_in]: the approximation itself."""
        return self.left @ self.right

    def to(self, dtype: torch.dtype) -> "Factors":
        """The factors in `dtype` (the products' working dtype); the energy stays as it is."""
        return Factors(self.left.to(dtype), self.right.to(dtype), self.energy)


def worth_it(d_out: int, d_in: int, rank: int) -> bool:
    """Low-rank saves work only if r (d_in + d_out) is well below d_in d_out (half, to pay for the sketch)."""
    return 2 * rank * (d_in + d_out) <= d_in * d_out


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of Y [K, n, l] from the small Gram matrix (eigh in float64) rather
    than a QR of the tall Y: LAPACK's QR/SVD on tall or batched inputs was 10-100x slower than the GEMMs
    around it on a 2-core CPU. Directions with a negligible eigenvalue (rank deficiency) come out as zeros."""
    Yd = Y.double()
    lam, V = torch.linalg.eigh(Yd.transpose(1, 2) @ Yd)
    # (where Y = 0 every lam is 0 and nothing is kept; rsqrt's inf where lam <= 0 is never selected)
    scale = torch.where(lam > lam[:, -1:] * 1e-12, lam.rsqrt(), 0.0)
    return Y @ (V * scale.unsqueeze(1)).to(Y.dtype)


def sketch_matrix(K: int, d_out: int, r: int, device, dtype, generator: Optional[torch.Generator] = None):
    """The Gaussian Omega [K, d_out, r] of `factorize` (from a private generator seeded with SEED unless given)."""
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(SEED)
    return torch.randn(K, d_out, r, generator=generator, device=device, dtype=dtype)


def factorize(W: torch.Tensor, rank: int, power_iters: int = POWER_ITERS,
              generator: Optional[torch.Generator] = None, omega: Optional[torch.Tensor] = None) -> Factors:
    """Rank-`rank` factors of each W[k] ([K, d_out, d_in]): Q ([d_in, r], orthonormal) spans the rows of
    W^T Omega (after `power_iters` rounds of W^T W), and W_r = (W Q) Q^T is the projection of W on them, so
    its kept energy is ||W Q|| / ||W||. `omega`: Omega given (`sketch_matrix`; e.g. under torch.func.vmap,
    which draws no random numbers)."""
    left, Q = range_finder(W, rank, power_iters, generator, omega)
    norm = torch.linalg.matrix_norm(W)
    energy = torch.where(norm > 0, torch.linalg.matrix_norm(left) / norm, 1.0)  # (NaN where norm = 0: not taken)
    return Factors(left=left, right=Q.transpose(1, 2), energy=energy.clamp(max=1.0))


def factorize_all(Ms: list[torch.Tensor], rank: int, at_once: bool) -> list[Factors]:
    """`factorize(M, rank)` of each M ([K, d_out, d_in]); `at_once` (foreach.batched): the matrices of one
    shape as one torch.func.vmap'ped call over their stack (each draws the Omega it would draw alone)."""
    if not at_once:
        return [factorize(M, rank) for M in Ms]
    groups: dict = {}
    for i, M in enumerate(Ms):
        groups.setdefault((M.shape, M.dtype, M.device), []).append(i)
    out: list = [None] * len(Ms)
    for (shape, dtype, device), members in groups.items():
        if len(members) == 1:
            out[members[0]] = factorize(Ms[members[0]], rank)
            continue
        K, d_out, d_in = shape
        omega = sketch_matrix(K, d_out, min(rank, d_out, d_in), device, dtype)
        left, right, energy = torch.func.vmap(
            lambda M, omega=omega: _fields(factorize(M, rank, omega=omega)))(torch.stack([Ms[i] for i in members]))
        for j, i in enumerate(members):
            out[i] = Factors(left[j], right[j], energy[j])
    return out


def _fields(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return f.left, f.right, f.energy


def range_finder(W: torch.Tensor, rank: int, power_iters: int = POWER_ITERS,
                 generator: Optional[torch.Generator] = None, omega: Optional[torch.Tensor] = None):
    """(W Q [K, d_out, r], Q [K, d_in, r]) of `factorize`, without the kept energy."""
    K, d_out, d_in = W.shape
    r = min(rank, d_out, d_in)
    if omega is None:
        omega = sketch_matrix(K, d_out, r, W.device, W.dtype, generator)
    Wt = W.transpose(1, 2)
    Q = _orthonormal(Wt @ omega)                             # [K, d_in, r]
    for _ in range(power_iters):                             # re-orthonormalise between products (stability)
        Q = _orthonormal(Wt @ _orthonormal(W @ Q))
    return W @ Q, Q


def lowrank_products(a: torch.Tensor, e: torch.Tensor, f: Factors, bias: Optional[torch.Tensor] = None):
    """(weight products [b, K], bias products [b, K] or None) for a [b, T, d_in], e [b, T, d_out]:
    sum_t (L_k^T e_{i,t}) . (R_k a_{i,t}), and with `bias` ([K, d_out]) sum_t e_{i,t} . bias_k, whose
    columns ride along in the GEMM over e (one pass over e instead of two)."""
    b, T, d_in = a.shape
    K, d_out, r = f.left.shape
    left = f.left.permute(1, 0, 2).reshape(d_out, K * r)
    if bias is not None:
        left = torch.cat([left, bias.reshape(K, d_out).T], 1)
    le = e.reshape(b * T, d_out) @ left                                  # [bT, K r (+ K)]
    ra = a.reshape(b * T, d_in) @ f.right.reshape(K * r, d_in).T         # [bT, K r]
    weight = torch.linalg.vecdot(ra.view(b * T, K, r), le[:, :K * r].view(b * T, K, r)).view(b, T, K).sum(1)
    return weight, (None if bias is None else le[:, K * r:].reshape(b, T, K).sum(1))
