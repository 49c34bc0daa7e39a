"""Low-rank products for matrix weights (Config.product_rank; DESIGN 2.6, research/calibration.md Q1).

Each matrix weight's product vector W_k ([d_out, d_in]) is replaced by its rank-r approximation
L_k R_k from a randomized range finder (sketch r + 8, one power iteration, SVD of the small
projection, truncated to r), computed once per step. Then
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
    left: torch.Tensor    # [K, d_out, r] (singular vectors times singular values)
    right: torch.Tensor   # [K, r, d_in]
    energy: torch.Tensor  # [K]: ||W_r,k||_F / ||W_k||_F (1 where W_k = 0)

    def dense(self) -> torch.Tensor:
        """[K, d_out, d_in]: the approximation itself."""
        return self.left @ self.right


def worth_it(d_out: int, d_in: int, rank: int) -> bool:
    """Low-rank saves work only if r (d_in + d_out) is well below d_in d_out (half, to pay for the sketch)."""
    return 2 * rank * (d_in + d_out) <= d_in * d_out


def factorize(W: torch.Tensor, rank: int, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS,
              generator: Optional[torch.Generator] = None) -> Factors:
    """Rank-`rank` factors of each W[k] ([K, d_out, d_in]) by the randomized range finder."""
    K, d_out, d_in = W.shape
    width = min(rank + oversample, d_out, d_in)
    if generator is None:
        generator = torch.Generator(device=W.device).manual_seed(SEED)
    omega = torch.randn(K, d_in, width, generator=generator, device=W.device, dtype=W.dtype)
    Q = torch.linalg.qr(W @ omega).Q                         # [K, d_out, width]: range of W
    for _ in range(power_iters):                             # re-orthonormalise between products (stability)
        Z = torch.linalg.qr(W.transpose(1, 2) @ Q).Q         # [K, d_in, width]
        Q = torch.linalg.qr(W @ Z).Q
    U, S, Vh = torch.linalg.svd(Q.transpose(1, 2) @ W, full_matrices=False)  # [K, width, d_in] is small
    r = min(rank, S.shape[1])
    left = (Q @ U[:, :, :r]) * S[:, None, :r]
    norm = torch.linalg.matrix_norm(W)
    kept = S[:, :r].square().sum(1).sqrt()
    energy = torch.where(norm > 0, kept / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.ones_like(norm))
    return Factors(left=left, right=Vh[:, :r], energy=energy)


def lowrank_products(a: torch.Tensor, e: torch.Tensor, f: Factors) -> torch.Tensor:
    """sum_t (L_k^T e_{i,t}) . (R_k a_{i,t}) for a [b, T, d_in], e [b, T, d_out] -> [b, K]."""
    b, T, d_in = a.shape
    K, d_out, r = f.left.shape
    ra = a.reshape(b * T, d_in) @ f.right.reshape(K * r, d_in).T                   # [bT, K r]
    le = e.reshape(b * T, d_out) @ f.left.permute(1, 0, 2).reshape(d_out, K * r)  # [bT, K r]
    return (ra * le).view(b, T, K, r).sum((1, 3))
