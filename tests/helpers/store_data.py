"""The synthetic score log of tests/unit/store/test_store.py and its worker: the data of every (rank, step)
is a pure function of its arguments, so tests compute expected totals with plain numpy, never from the
store's own output."""
from __future__ import annotations

import numpy as np

N, K, SPR, STEPS_PER_CHUNK = 500, 3, 6, 4
TARGETS = ["val", "code", "math"]
CONFIG = {"estimator": "secant", "order": 2, "lr": 1e-3}


def step_data(rank: int, step: int, seed: int = 0):
    """Ids (distinct within the rank's step; some slots unused), scores [b, K], per-sample loss."""
    rng = np.random.default_rng([seed, rank, step])
    b = int(rng.integers(1, SPR + 1))
    ids = rng.choice(N, size=b, replace=False).astype(np.int64)
    scores = rng.standard_normal((b, K)).astype(np.float32)
    loss = rng.random(b).astype(np.float32)
    return ids, scores, loss


def expected_totals(world: int, steps: int, seed: int = 0):
    """numpy sums of every score each sample received: the reference for the store's totals."""
    value = np.zeros((N, K), np.float64)
    count = np.zeros(N, np.int64)
    for r in range(world):
        for t in range(steps):
            ids, sc, _ = step_data(r, t, seed)
            np.add.at(value, ids, sc.astype(np.float64))
            np.add.at(count, ids, 1)
    return value, count
