"""Reductions over many tensors in a few kernels: one launch per group of parameters on a GPU, not one per
parameter (torch's `_foreach_*` ops do the element-wise part)."""
from __future__ import annotations

import functools

import torch

CHUNK_NUMBERS = 1 << 26  # products held at once (256 MiB in fp32) before they are summed


def dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """[len(xs), K]: <x_i[k], y_i> for x_i [K, n_i] and y_i [n_i] (the same K for all; at least one pair).

    The products of a chunk of pairs are laid end to end and summed per pair (`segment_reduce`), so the
    temporaries hold at most about CHUNK_NUMBERS numbers whatever the model's size."""
    K = xs[0].shape[0]
    out, lo = [], 0
    while lo < len(xs):
        hi, numbers = lo, 0
        while hi < len(xs) and (hi == lo or numbers + xs[hi].numel() <= CHUNK_NUMBERS):
            numbers += xs[hi].numel()
            hi += 1
        flat = torch.cat(torch._foreach_mul(xs[lo:hi], ys[lo:hi]), dim=1)  # [K, sum n_i]
        lengths = _lengths(tuple(x.shape[1] for x in xs[lo:hi]), K, flat.device)
        # (unsafe: lengths are right by construction; checking them would read the device back)
        out.append(torch.segment_reduce(flat, "sum", lengths=lengths, axis=1, unsafe=True).reshape(K, hi - lo).T)
        lo = hi
    return out[0] if len(out) == 1 else torch.cat(out)


@functools.lru_cache(maxsize=64)
def _lengths(lengths: tuple, K: int, device: torch.device) -> torch.Tensor:
    """[K, pairs] segment lengths on the device, copied there once per model layout (a copy to the device
    can wait for it)."""
    return torch.tensor(lengths).expand(K, len(lengths)).contiguous().to(device)
