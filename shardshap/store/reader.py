"""open_scores: read a score store (totals, the labelled step log, attributes)."""

from __future__ import annotations

import copy
import os
from functools import cached_property

import numpy as np
import xarray as xr

from . import schema
from .schema import COMMITTED, Layout


def uncommitted_slots(layout: Layout, committed, steps) -> np.ndarray:
    """[len(steps), num_slots] bool: True where the slot's rank had not committed the step. Such slots
    hold what a killed writer left (or nothing) and never count, as in reduce."""
    rank = np.arange(layout.num_slots) // layout.slots_per_rank
    return np.asarray(steps)[:, None] > np.asarray(committed)[rank][None, :]


class ScoreStore:
    """Read-only view of a store written by ScoreWriter (any number of ranks)."""

    steps: tuple[int, int] | None = None  # (lo, hi) for a view of a window of steps (over_steps)

    def __init__(self, path):
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise schema.StoreError(f"the store path must be a str or os.PathLike, got {path!r}") from None
        self.group = schema.read_group(self.path, mode="r")
        self.attrs: dict = self.group.attrs.asdict()
        self.layout = Layout.from_attrs(self.attrs)
        self.targets: list[str] = list(self.attrs["targets"])
        for name in schema.SLOT_ARRAYS + schema.STEP_ARRAYS + schema.RANK_ARRAYS + schema.TOTAL_ARRAYS:
            schema.open_array(self.group, name)

    @property
    def committed_steps(self) -> np.ndarray:
        """Per rank, the last step durably on disk (-1: none); later steps never count."""
        return schema.open_array(self.group, COMMITTED)[:]

    @property
    def num_steps(self) -> int:
        """Steps in the log: one past the last committed step of any rank."""
        return int(self.committed_steps.max()) + 1

    @property
    def totals_current(self) -> bool:
        t = self.attrs.get("totals")
        return bool(t) and list(t.get("committed_step", [])) == self.committed_steps.tolist()

    def _check_totals(self):
        if not self.totals_current:
            raise schema.StaleTotalsError(
                f"the totals of {self.path!r} do not match its log (the writer was not closed, or "
                "the log changed since). Rebuild them with shardshap.store.reduce_store(path) or "
                "open_scores(path).reduce()."
            )

    @cached_property
    def value(self) -> np.ndarray:
        """[num_samples, K] float64: each sample's scores summed over the steps it took part in."""
        self._check_totals()
        return self.group["value"][:]

    @cached_property
    def count(self) -> np.ndarray:
        """[num_samples] int64: number of steps each sample took part in."""
        self._check_totals()
        return self.group["count"][:]

    @cached_property
    def step_log(self) -> xr.Dataset:
        """Lazy (dask) Dataset of the log with dims (step, slot, target), cut to the committed steps.

        Slots of a rank beyond its committed step (left by a killed writer) are masked as missing.
        """
        ds = xr.open_zarr(self.path, consolidated=False)
        names = list(schema.SLOT_ARRAYS + schema.STEP_ARRAYS)
        ds = ds[names].isel(step=slice(0, max(self.num_steps, 0)))
        L = self.layout
        rank = np.arange(L.num_slots) // L.slots_per_rank
        ds = ds.assign_coords(step=np.arange(ds.sizes["step"]), rank=("slot", rank))
        committed = self.committed_steps
        if ds.sizes["step"] and committed.min() < committed.max():
            ok = xr.DataArray(~uncommitted_slots(L, committed, ds["step"].values), dims=("step", "slot"))
            for n in schema.SLOT_ARRAYS:
                ds[n] = ds[n].where(ok, schema.FILL[n])
        return ds

    def read_steps(self, lo: int, hi: int, names=schema.SLOT_ARRAYS, committed=None) -> dict:
        """Steps [lo, hi) of log arrays as numpy, uncommitted slots set to missing (as in step_log).

        `committed`: the per-rank committed steps to mask with (default: read now); pass one snapshot
        when reading the log in several pieces."""
        committed = self.committed_steps if committed is None else np.asarray(committed)
        hi = min(hi, self.layout.max_steps)
        out = {name: schema.open_array(self.group, name)[lo:hi] for name in names}
        stale = uncommitted_slots(self.layout, committed, np.arange(lo, hi))
        if stale.any():
            for name in names:
                if name in schema.SLOT_ARRAYS:
                    out[name][stale] = schema.FILL[name]
        return out

    def over_steps(self, lo: int, hi: int) -> "ScoreStore":
        """A view of steps [lo, hi) only: `value` and `count` rebuilt from the log of those steps (read one
        log chunk of steps at a time; memory: the totals plus one chunk), `step_log` cut to them. The stored
        totals are not touched. Steps past the committed log are empty."""
        n = self.num_steps
        if not (0 <= lo < hi):
            raise schema.StoreError(f"step window {lo}:{hi} is empty or negative: give A:B with 0 <= A < B")
        if lo >= n:
            raise schema.StoreError(f"step window {lo}:{hi} starts after the log, which has {n} committed steps")
        hi = min(hi, n)
        L, K = self.layout, len(self.targets)
        value = np.zeros((L.num_samples, K), np.float64)
        count = np.zeros(L.num_samples, np.int64)
        committed = self.committed_steps
        for start in range(lo, hi, L.steps_per_chunk):
            part = self.read_steps(start, min(hi, start + L.steps_per_chunk), ("sample_id", "score"), committed)
            ids, sc = part["sample_id"].reshape(-1), part["score"].reshape(-1, K)
            keep = ids >= 0  # -1: an empty slot, or one a rank had not committed
            ids, sc = ids[keep], sc[keep].astype(np.float64)
            count += np.bincount(ids, minlength=L.num_samples)
            for k in range(K):
                value[:, k] += np.bincount(ids, weights=sc[:, k], minlength=L.num_samples)
        view = copy.copy(self)
        view.__dict__.update(value=value, count=count, step_log=self.step_log.isel(step=slice(lo, hi)),
                             steps=(lo, hi))
        return view

    def reduce(self, processes: int | None = None, **kw) -> dict:
        """Rebuild value/count from the log (see reduce_store) and refresh this view."""
        from .reduce import reduce_store

        out = reduce_store(self.path, processes, **kw)
        self.__init__(self.path)
        for name in ("value", "count"):
            self.__dict__.pop(name, None)
        return out

    def __repr__(self) -> str:
        return (f"ScoreStore({self.path!r}, run_id={self.attrs.get('run_id')!r}, "
                f"samples={self.layout.num_samples}, targets={self.targets}, steps={self.num_steps}, "
                f"ranks={self.layout.world_size})")


def open_scores(path) -> ScoreStore:
    """Open a score store for reading; raises StoreFormatError if it is not a valid store."""
    return ScoreStore(path)
