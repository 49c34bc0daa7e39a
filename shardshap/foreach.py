"""Reductions over many tensors in a few kernels: one launch per group of parameters on a GPU, not one per
parameter (torch's `_foreach_*` ops do the element-wise part)."""
from __future__ import annotations

import functools

import torch

CHUNK_NUMBERS = 1 << 26  # products held at once (256 MiB in fp32) before they are summed


def chunks(numbers: list[int], budget: int = CHUNK_NUMBERS) -> list[list[int]]:
    """Indices 0..len(numbers)-1 in consecutive runs whose numbers add up to at most `budget` (at least one
    index per run): what to read and reduce at once so that the temporaries stay bounded."""
    out, current, held = [], [], 0
    for i, n in enumerate(numbers):
        if current and held + n > budget:
            out.append(current)
            current, held = [], 0
        current.append(i)
        held += n
    return out + [current] if current else out


def dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """[len(xs), K]: <x_i[k], y_i> for x_i [K, n_i] and y_i [n_i] (the same K for all; at least one pair).

    The products are laid end to end and summed per pair (`segment_reduce`): temporaries of K * sum n_i
    numbers (and as many in float64), which the caller bounds (`chunks`)."""
    K = xs[0].shape[0]
    # summed in float64: segment_reduce adds sequentially, and a float32 sum of a large parameter's products,
    # which cancel, would lose the digits that the completeness check compares
    flat = torch.cat(torch._foreach_mul(xs, ys), dim=1).double()  # [K, sum n_i]
    lengths = _lengths(tuple(x.shape[1] for x in xs), K, flat.device)
    # (unsafe: lengths are right by construction; checking them would read the device back)
    out = torch.segment_reduce(flat, "sum", lengths=lengths, axis=1, unsafe=True).reshape(K, len(xs)).T
    return out.to(xs[0].dtype)


@functools.lru_cache(maxsize=64)
def _lengths(lengths: tuple, K: int, device: torch.device) -> torch.Tensor:
    """[K, pairs] segment lengths on the device, copied there once per model layout (a copy to the device
    can wait for it)."""
    return torch.tensor(lengths).expand(K, len(lengths)).contiguous().to(device)
