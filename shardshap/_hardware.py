"""Probes of what the hardware does fast."""
from __future__ import annotations

import warnings

import torch


def warn_if_bf16_is_emulated(device: torch.device) -> None:
    """bf16 products pay off only on bf16 matrix units; elsewhere oneDNN/cuBLAS emulate them, slowly."""
    if device.type == "cuda":
        native, what = torch.cuda.get_device_capability(device) >= (8, 0), "GPU before sm80"
    elif device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
        native, what = bool(probe is None or probe()), "CPU without AMX"
    else:
        return
    if not native:
        warnings.warn(f"bf16 attribution math (Config cache_dtype / target_dtype) on a {what}: bf16 matrix "
                      "multiplications are emulated there (many times slower than float32), so attribution "
                      "gets slower, not faster; use preset='lowrank' (product_rank=16) or 'exact'", stacklevel=4)
