"""shardshap: In-Run Data Shapley values computed during training.

Names are imported lazily, so that `shardshap.store` (numpy + zarr) can be used without loading torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Attributor": "attributor", "SIGN_CONVENTION": "store.schema", "StepResult": "types",
    "Config": "config", "open_scores": "store", "init_distributed": "backends", "shutdown": "backends",
    **{name: "errors" for name in (
        "ShardshapError", "AttributionError", "BatchShapeError", "ConfigError", "UnsupportedModule",
        "UnsupportedOptimizer", "UnsupportedEngine", "StoreError")},
}

_SUBMODULES = ("analysis", "backends", "errors", "estimators", "ghost", "optim", "oracle", "store", "verify")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'shardshap' has no attribute {name!r}")


def __dir__():
    return __all__
