"""Low-rank products for matrix weights (Config.product_rank; DESIGN 2.6, research/calibration.md Q1).

Each matrix weight's product vector W_k ([d_out, d_in]) is replaced by its rank-r approximation
L_k R_k from a randomized range finder (sketch r + 8, one power iteration, the top-r singular subspace
of the small projection), computed once per step. Then
    sum_t e_t^T W_k a_t ~ sum_t (L_k^T e_t) . (R_k a_t)
costs tokens * r * (d_in + d_out) instead of tokens * d_in * d_out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MIN_ENERGY = 0.95  # below this kept energy ||W_r|| / ||W||, a layer falls back to exact products
OVERSAMPLE = 8
POWER_ITERS = 1
SEED = 0x5EED  # a private generator: the sketch never touches training's random numbers


@dataclass
class Factors:
    """W_k ~ left[k] @ right[k] for a weight seen as [K, d_out, d_in]."""
    left: torch.Tensor    # [K, d_out, r] (orthonormal columns)
    right: torch.Tensor   # [K, r, d_in]
    energy: torch.Tensor  # [K]: ||W_r,k||_F / ||W_k||_F (1 where W_k = 0)

    def dense(self) -> torch.Tensor:
        """[K, d_out, d_in]: the approximation itself."""
        return self.left @ self.right


def worth_it(d_out: int, d_in: int, rank: int) -> bool:
    """Low-rank saves work only if r (d_in + d_out) is well below d_in d_out (half, to pay for the sketch)."""
    return 2 * rank * (d_in + d_out) <= d_in * d_out


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of Y [K, n, l] from the small Gram matrix (eigh in float64) rather
    than a QR of the tall Y: LAPACK's QR/SVD on tall or batched inputs was 10-100x slower than the GEMMs
    around it on a 2-core CPU. Directions with a negligible eigenvalue (rank deficiency) come out as zeros."""
    G = Y.transpose(1, 2).double() @ Y.double()
    lam, V = torch.linalg.eigh(G)
    keep = lam > lam[:, -1:].clamp_min(1e-300) * 1e-12
    scale = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    return Y @ (V * scale.unsqueeze(1)).to(Y.dtype)


def factorize(W: torch.Tensor, rank: int, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS,
              generator: Optional[torch.Generator] = None) -> Factors:
    """Rank-`rank` factors of each W[k] ([K, d_out, d_in]) by the randomized range finder: Q spans W's range,
    B = Q^T W, and the top-r eigenvectors U_r of B B^T (the left singular vectors of B) give
    W_r = (Q U_r) (U_r^T B), the projection of W on its estimated top-r left singular subspace."""
    K, d_out, d_in = W.shape
    width = min(rank + oversample, d_out, d_in)
    if generator is None:
        generator = torch.Generator(device=W.device).manual_seed(SEED)
    omega = torch.randn(K, d_in, width, generator=generator, device=W.device, dtype=W.dtype)
    Q = _orthonormal(W @ omega)                              # [K, d_out, width]: range of W
    for _ in range(power_iters):                             # re-orthonormalise between products (stability)
        Q = _orthonormal(W @ _orthonormal(W.transpose(1, 2) @ Q))
    B = Q.transpose(1, 2) @ W                                # [K, width, d_in]
    lam, U = torch.linalg.eigh(B.double() @ B.transpose(1, 2).double())  # ascending
    r = min(rank, width)
    U_r = U[:, :, -r:].flip(-1).to(W.dtype)                  # top r, largest first
    kept = lam[:, -r:].clamp_min(0).sum(1).sqrt()
    norm = torch.linalg.matrix_norm(W).double()
    energy = torch.where(norm > 0, kept / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.ones_like(norm))
    return Factors(left=Q @ U_r, right=U_r.transpose(1, 2) @ B, energy=energy.clamp(max=1.0).to(W.dtype))


def lowrank_products(a: torch.Tensor, e: torch.Tensor, f: Factors) -> torch.Tensor:
    """sum_t (L_k^T e_{i,t}) . (R_k a_{i,t}) for a [b, T, d_in], e [b, T, d_out] -> [b, K]."""
    b, T, d_in = a.shape
    K, d_out, r = f.left.shape
    ra = a.reshape(b * T, d_in) @ f.right.reshape(K * r, d_in).T                   # [bT, K r]
    le = e.reshape(b * T, d_out) @ f.left.permute(1, 0, 2).reshape(d_out, K * r)  # [bT, K r]
    return (ra * le).view(b, T, K, r).sum((1, 3))
