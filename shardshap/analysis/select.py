"""Index lists of samples to keep for retraining, by a rule on their values."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

RULES = ("drop-negative", "drop-lowest")


def select_keep(value: np.ndarray, count: np.ndarray, rule: str, target: int | None = None,
                fraction: float = 0.1) -> np.ndarray:
    """Ids to keep. `target`: a target index, or None for the sum over targets. Samples never seen in
    training have no value and are kept (nothing is known against them)."""
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    v = value.sum(1) if target is None else value[:, target]
    seen = count > 0
    keep = np.ones(len(v), dtype=bool)
    if rule == "drop-negative":
        keep[seen & (v < 0)] = False
    else:
        if not 0 < fraction < 1:
            raise ConfigError(f"fraction={fraction} must be in (0, 1): the share of the seen samples to drop")
        idx = np.flatnonzero(seen)
        n_drop = int(round(fraction * len(idx)))
        keep[idx[np.argsort(v[idx], kind="stable")[:n_drop]]] = False
    return np.flatnonzero(keep)
