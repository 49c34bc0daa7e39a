"""Math over many tensors in a few kernels: one launch per group of parameters on a GPU, not one per
parameter (torch's `_foreach_*` ops do the element-wise part), and when to use it (`batched`)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

CHUNK_NUMBERS = 1 << 26  # products held at once (256 MiB in fp32) before they are summed
# Batched kernels (foreach secant, layers stacked under vmap, segment sums): None = on accelerators only. A
# CPU launches nothing and runs foreach ops tensor by tensor; there the stacking copies and the longer
# kernels cost time (W1: secant 85 vs 68 ms, products 380 vs 310 ms, completeness dots 47 vs 6 ms).
# True / False force it (benchmarks/launches.py counts the accelerator path on a CPU).
BATCH_KERNELS: Optional[bool] = None


def batched(device) -> bool:
    """Whether attribution on `device` takes many parameters per kernel (BATCH_KERNELS)."""
    return BATCH_KERNELS if BATCH_KERNELS is not None else torch.device(device).type != "cpu"


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

    Batched (`batched`), the products are laid end to end and summed per pair (`segment_reduce`):
    temporaries of K * sum n_i numbers (and as many in float64), which the caller bounds (`chunks`); else one
    dot per pair."""
    if not batched(xs[0].device):
        return torch.stack([torch.linalg.vecdot(x, y) for x, y in zip(xs, ys)])
    K = xs[0].shape[0]
    # summed in float64: segment_reduce adds sequentially, and a float32 sum of a large parameter's products,
    # which cancel, would lose the digits that the completeness check compares
    flat = torch.cat(torch._foreach_mul(xs, ys), dim=1).double()  # [K, sum n_i]
    lengths = on_device((tuple(x.shape[1] for x in xs),) * K, torch.int64, flat.device)  # [K, pairs]
    # (unsafe: lengths are right by construction; checking them would read the device back)
    out = torch.segment_reduce(flat, "sum", lengths=lengths, axis=1, unsafe=True).reshape(K, len(xs)).T
    return out.to(xs[0].dtype)


@functools.lru_cache(maxsize=64)
def on_device(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (numbers, or tuples of them) as a tensor on the device, copied there once per distinct value:
    a copy to the device can wait for it."""
    return torch.tensor(values, dtype=dtype, device=device)
