"""Every error shardshap raises. Catch `ShardshapError` for all of them.

Each class also derives from the builtin that fits (as zarr's errors do), so code that caught
`ValueError` or `TypeError` before keeps working. Errors raised by `Attributor.step` and
`Attributor.attribute` mean the optimizer has not stepped and the store holds nothing of the step.
This module imports nothing heavy: the store and the CLI use it without torch.
"""
from __future__ import annotations


class ShardshapError(Exception):
    """The root of shardshap's errors."""


class ConfigError(ShardshapError, ValueError):
    """A configuration key or value is invalid; the message names the key and what is allowed."""


class AttributionError(ShardshapError, RuntimeError):
    """Bad input or an inconsistency detected during a step; the optimizer has not stepped."""


class BatchShapeError(AttributionError, ValueError):
    """A micro-batch's tensors do not have the batch size its sample ids give."""


class UnsupportedModule(ShardshapError, TypeError):
    """A trainable parameter (or a module option) has no per-sample product rule."""


class UnsupportedOptimizer(ShardshapError, TypeError):
    """The optimizer (or one of its options) has no update rule in shardshap."""


class UnsupportedEngine(ShardshapError, TypeError):
    """The training engine (DDP, FSDP2, DeepSpeed) or its layout is not supported, or is misused."""


class StoreError(ShardshapError, ValueError):
    """A score store, or a request to write or read one, is invalid."""


class StoreFormatError(StoreError):
    """The path is not a valid shardshap score store (or its metadata is corrupted)."""


class StoreMismatchError(StoreError):
    """The store belongs to another run, config or layout than the writer that opens it."""


class StaleTotalsError(StoreError, RuntimeError):
    """The per-sample totals do not match the log (the run did not close cleanly); run reduce."""


class StoreWriteError(StoreError, OSError):
    """Writing the store failed (disk full, permissions, ...); every step committed before is intact."""


class StoreClosedError(StoreError, RuntimeError):
    """The writer was used after close()."""


__all__ = [
    "AttributionError", "BatchShapeError", "ConfigError", "ShardshapError", "StaleTotalsError",
    "StoreClosedError", "StoreError", "StoreFormatError", "StoreMismatchError", "StoreWriteError",
    "UnsupportedEngine", "UnsupportedModule", "UnsupportedOptimizer",
]
