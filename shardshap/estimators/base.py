"""The estimator interface and its registry (Config.estimator names an entry)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError, UnsupportedOptimizer


@dataclass
class Frozen:
    """What an estimator fixes for one parameter and one step."""
    multiplier: torch.Tensor            # M, shape of the owned elements (compute dtype)
    shift: Optional[torch.Tensor]       # theta_mid - theta_t (None for order 1)


class Estimator(ABC):
    """One way of freezing a step's game. `name` is the value of Config.estimator."""

    name: str = ""
    needs: str = ""  # what `supports` requires, for the error message
    uses_cold_start: bool = False  # Config.cold_start may replace M on the first steps (estimators/owen.py)

    def supports(self, update_rule) -> bool:
        """Whether the estimator is defined for this optimizer update rule (shardshap.optim)."""
        return True

    def check(self, update_rule, optimizer) -> None:
        """Raise UnsupportedOptimizer naming the fix when `supports` is False."""
        if not self.supports(update_rule):
            usable = [n for n, e in ESTIMATORS.items() if e.supports(update_rule)]
            raise UnsupportedOptimizer(
                f"estimator={self.name!r} needs {self.needs}, not {type(optimizer).__name__}; use one of "
                f"{', '.join(map(repr, usable))} ('secant' works for every supported optimizer)")

    @abstractmethod
    def freeze(self, update_rule, shard, clip_factor: float, dtype: torch.dtype, *, order: int,
               compiled: bool = False) -> Frozen:
        """M (and the order-2 shift) for one parameter's owned elements. `shard.grad` is the clipped
        gradient the optimizer is about to receive; `compiled`: Config.compile_math."""

    def freeze_all(self, update_rule, shards: dict, clip_factor: float, dtype: torch.dtype, *, order: int,
                   compiled: bool = False) -> dict[int, Frozen]:
        """`freeze` for every parameter of a step ({id: OwnedSlice} -> {id: Frozen}); an estimator may do
        them all at once (a few foreach kernels instead of a loop of small ones per parameter)."""
        return {pid: self.freeze(update_rule, sh, clip_factor, dtype, order=order, compiled=compiled)
                for pid, sh in shards.items()}


ESTIMATORS: dict[str, Estimator] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: make `cls` selectable as Config(estimator=cls.name)."""
    ESTIMATORS[cls.name] = cls()
    return cls


def get(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ConfigError(f"unknown estimator {name!r}; choose one of {', '.join(map(repr, ESTIMATORS))}") from None
