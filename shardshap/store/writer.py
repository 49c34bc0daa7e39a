"""ScoreWriter: streams per-sample scores of every step into a Zarr v3 store, one rank each.

Each rank owns the columns `[rank * slots_per_rank, (rank + 1) * slots_per_rank)` of the per-slot
log arrays, and the chunk layout makes every chunk belong to one rank, so ranks never touch the
same file (Zarr has no locks). Rows of one chunk (`steps_per_chunk` steps) are buffered in memory
and written whole by a background thread; a training step only copies its scores into the buffer.
"""

from __future__ import annotations

import json
import operator
import os
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from ..errors import StoreClosedError, StoreError, StoreMismatchError, StoreWriteError
from . import schema
from .schema import COMMITTED, DTYPES, FILL, SLOT_ARRAYS, WRITTEN, Layout


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numpy(x, dtype=None, name="input") -> np.ndarray:
    """Array from numpy, lists or torch tensors (any device) without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{name} must be numbers (a list, numpy array or tensor), got {type(x).__name__}: "
                         f"{e}") from e


def _int(name: str, value) -> int:
    """An integer argument (numpy and torch integers too); floats, strings and None are refused."""
    try:
        return operator.index(value)
    except TypeError:
        raise StoreError(f"{name} must be an integer, got {value!r}") from None


@dataclass
class _Block:
    """In-memory copy of one chunk row (steps_per_chunk steps) of this rank's part of the log."""

    row: int
    arrays: dict = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def empty(cls, row: int, layout: Layout, with_steps: bool) -> _Block:
        c, spr, K = layout.steps_per_chunk, layout.slots_per_rank, layout.num_targets
        shapes = {"sample_id": (c, spr), "score": (c, spr, K), "sample_loss": (c, spr)}
        if with_steps:  # rank 0 also owns the per-step scalars
            shapes.update({"lr": (c,), "loss": (c,), "target_loss": (c, K), "residual": (c,),
                           "wall_time": (c,)})
        return cls(row, {n: np.full(s, FILL[n], DTYPES[n]) for n, s in shapes.items()})

    def copy(self) -> _Block:
        return _Block(self.row, {n: a.copy() for n, a in self.arrays.items()}, self.dirty)


class ScoreWriter:
    """Writes one rank's share of the per-step score log of a run (see docs/store.md).

    Rank 0 creates the store (or validates an existing one of the same run), then all ranks meet
    at `barrier`. Steps must be written in increasing order. `flush()` writes everything so far and
    records this rank's last committed step (safe against a crash of the process; `flush(durable=True)`
    also fsyncs, against power loss); `close()` flushes and, by default, rebuilds the per-sample totals
    with all ranks taking part. Errors are StoreError subclasses (shardshap.errors, docs/store.md).

    Options beyond the core interface:
      max_steps: pre-allocated step extent (arrays are never resized); writing beyond it is an error.
      steps_per_chunk: steps per log chunk; default keeps a score chunk near 1 M values.
      compressor: a zarr codec (e.g. zarr.codecs.ZstdCodec(level=3)), None for none, or "default"
        (Blosc zstd level 3, bitshuffle; docs/store.md).
      totals_compressor: the same for value/count ("default": Blosc zstd level 1, byte shuffle).
      total_chunk_rows: samples per chunk of value/count (and the granularity of reduce blocks).
      queue_chunks: chunk rows that may wait for the disk before write_step blocks (memory bound).
      reduce_on_close / reduce_processes / reduce_memory_bytes: totals at close.
      agree: a collective `agree(ok: bool) -> bool` (True when every rank is ok): when given, a store that
        rank 0 refuses (another run's, a bad path) raises on every rank at once instead of leaving the
        others waiting at the barrier until its timeout.
    """

    def __init__(
        self,
        path,
        *,
        run_id: str,
        config: dict,
        targets: list[str],
        num_samples: int,
        slots_per_rank: int,
        world_size: int = 1,
        rank: int = 0,
        barrier=None,
        agree=None,
        overwrite: bool = False,
        resume_step: int | None = None,
        metadata: dict | None = None,
        max_steps: int = schema.DEFAULT_MAX_STEPS,
        steps_per_chunk: int | None = None,
        compressor="default",
        totals_compressor="default",
        total_chunk_rows: int = schema.DEFAULT_TOTAL_CHUNK_ROWS,
        queue_chunks: int = 2,
        reduce_on_close: bool = True,
        reduce_processes: int = 1,
        reduce_memory_bytes: int | None = None,
    ):
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise StoreError(f"the store path must be a str or os.PathLike, got {path!r}") from None
        self.rank, self.world_size = _int("rank", rank), _int("world_size", world_size)
        if isinstance(targets, str) or not hasattr(targets, "__iter__"):
            raise StoreError(f"targets must be a list of names, got {targets!r}")
        targets = [str(t) for t in targets]
        num_samples, slots_per_rank = _int("num_samples", num_samples), _int("slots_per_rank", slots_per_rank)
        max_steps, total_chunk_rows = _int("max_steps", max_steps), _int("total_chunk_rows", total_chunk_rows)
        if steps_per_chunk is not None:
            steps_per_chunk = _int("steps_per_chunk", steps_per_chunk)
        self._check_args(run_id, targets, num_samples, slots_per_rank, barrier, max_steps,
                         steps_per_chunk, total_chunk_rows)
        self._barrier = barrier if barrier is not None else (lambda: None)
        self.run_id = str(run_id)
        self.targets = targets
        self.reduce_on_close = reduce_on_close
        self.reduce_processes = reduce_processes
        self.reduce_memory_bytes = reduce_memory_bytes
        if steps_per_chunk is None:
            steps_per_chunk = schema.choose_steps_per_chunk(slots_per_rank, len(targets), max_steps)
        max_steps = -(-max_steps // steps_per_chunk) * steps_per_chunk  # whole chunk rows
        self.layout = Layout(num_samples, len(targets), self.world_size, slots_per_rank, steps_per_chunk,
                             max_steps, total_chunk_rows)
        identity = {
            "format": schema.FORMAT_NAME,
            "format_version": schema.FORMAT_VERSION,
            "run_id": self.run_id,
            "config": json.loads(schema.canonical_json(config)),
            "targets": targets,
            **self.layout.to_attrs(),
        }

        if resume_step is not None:  # checked before the store is touched
            resume_step = _int("resume_step", resume_step)
            if not 0 <= resume_step <= max_steps:
                raise StoreError(f"resume_step {resume_step} outside [0, max_steps={max_steps}]")
        refused = None
        if self.rank == 0:
            try:
                self._prepare_store(identity, metadata or {}, compressor, totals_compressor, overwrite)
            except StoreError as err:
                refused = err
        if agree is not None and not agree(refused is None):
            raise refused or StoreError(f"rank 0 refused the store {self.path!r} (its error names the problem "
                                        "and the fix); this rank stops too")
        if refused is not None:
            raise refused
        self._barrier()  # the store exists and is valid from here on
        self.group = schema.read_group(self.path, mode="r+")
        self._check_identity(self.group.attrs.asdict(), identity)
        self._arrays = {n: schema.open_array(self.group, n) for n in schema.SLOT_ARRAYS
                        + schema.STEP_ARRAYS + schema.RANK_ARRAYS}
        self._cols = slice(self.rank * slots_per_rank, (self.rank + 1) * slots_per_rank)
        self._committed = int(self._arrays[COMMITTED][self.rank])
        self._hwm = int(self._arrays[WRITTEN][self.rank])  # only the writer thread updates it
        self._buf: _Block | None = None
        self._last_step: int | None = None  # last step given to write_step
        self._before_last: int | None = None  # the one before it (retract)
        self._unsynced: set[str] = set()  # files this rank wrote since the last durable flush
        self._synced_all = False  # the first durable flush syncs the whole store (its metadata too)
        self._resumed = False
        self._closed = False
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_chunks))
        self._thread = threading.Thread(target=self._drain, name=f"shardshap-store-r{self.rank}",
                                        daemon=True)
        self._thread.start()
        if resume_step is not None:
            try:
                self._resume(resume_step)
            except BaseException:
                self._closed = True
                self._queue.put(None)  # do not leave the thread behind
                raise

    # ------------------------------------------------------------------ setup
    def _check_args(self, run_id, targets, num_samples, slots_per_rank, barrier, max_steps,
                    steps_per_chunk, total_chunk_rows):
        if not self.path:
            raise StoreError("the store path is empty; pass a directory path such as 'run.zarr'")
        if not run_id:
            raise StoreError("run_id must be a non-empty string that identifies the run")
        if not targets or len(set(targets)) != len(targets):
            raise StoreError(f"targets must be a non-empty list of distinct names, got {targets!r}")
        if num_samples <= 0:
            raise StoreError(f"num_samples must be positive, got {num_samples}")
        if slots_per_rank <= 0:
            raise StoreError(f"slots_per_rank must be positive, got {slots_per_rank}")
        if not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.world_size > 1 and barrier is None:
            raise StoreError("world_size > 1 needs barrier= (e.g. torch.distributed.barrier): rank 0 "
                             "creates the store and the others must wait for it")
        if max_steps <= 0 or (steps_per_chunk is not None and steps_per_chunk <= 0) or total_chunk_rows <= 0:
            raise StoreError(f"max_steps, steps_per_chunk and total_chunk_rows must be positive, got "
                             f"{max_steps}, {steps_per_chunk}, {total_chunk_rows}")

    def _prepare_store(self, identity: dict, metadata: dict, compressor, totals_compressor,
                       overwrite: bool):
        """Rank 0: create the store, or validate an existing one and invalidate its totals."""
        p = Path(self.path)
        if p.exists() and not p.is_dir():  # a store is always a directory: never delete a user's file
            raise StoreError(f"{self.path!r} is an existing file, not a score store (a store is a directory); "
                             "pass a new path such as 'run.zarr', or move the file away")
        empty = not p.exists() or not any(p.iterdir())  # an empty directory is as good as a new path
        if not empty and not ((p / "zarr.json").exists() or (p / "score").exists()):
            raise StoreError(f"{self.path!r} is a non-empty directory that does not look like a score store (no "
                             f"zarr.json): refusing to {'overwrite' if overwrite else 'write into'} it; pass a new "
                             "or empty directory")
        if not empty and overwrite:
            shutil.rmtree(p)
        elif not empty:
            schema.sweep_partials(p)
            group = schema.read_group(p, mode="r+")
            self._check_identity(group.attrs.asdict(), identity, hint=True)
            for name in schema.SLOT_ARRAYS + schema.STEP_ARRAYS + schema.RANK_ARRAYS:
                schema.open_array(group, name)
            group.attrs["totals"] = None  # the log is about to change
            return
        attrs = {
            **identity,
            "sign_convention": schema.SIGN_CONVENTION,
            "max_global_batch": self.layout.num_slots,
            "metadata": json.loads(schema.canonical_json(metadata)),
            "library_versions": schema.library_versions(),
            "totals": None,
        }
        try:
            self._create(attrs, compressor, totals_compressor)
        except OSError as err:
            raise StoreWriteError(f"cannot create the store at {self.path!r}: {err}. Check that the parent "
                                  "directory exists as a directory and is writable") from err

    def _create(self, attrs: dict, compressor, totals_compressor):
        group = zarr.open_group(self.path, mode="w-", attributes=attrs)
        log_codec = schema.default_compressor() if compressor == "default" else compressor
        totals_codec = (schema.default_totals_compressor() if totals_compressor == "default"
                        else totals_compressor)
        for name in schema.SLOT_ARRAYS + schema.STEP_ARRAYS + schema.RANK_ARRAYS + schema.TOTAL_ARRAYS:
            group.create_array(
                name, shape=self.layout.shape(name), chunks=self.layout.chunks(name),
                dtype=DTYPES[name], fill_value=FILL[name], dimension_names=schema.DIMS[name],
                compressors=totals_codec if name in schema.TOTAL_ARRAYS else log_codec,
            )
        tgt = group.create_array(schema.TARGET_COORD, shape=(len(self.targets),), dtype=str,
                                 dimension_names=schema.DIMS[schema.TARGET_COORD])
        tgt[:] = np.array(self.targets)

    def _check_identity(self, attrs: dict, identity: dict, hint: bool = False):
        fix = (" Use a new store path, pass overwrite=True to replace it, or pass the same "
               "run_id/config/layout to resume.") if hint else ""
        for key, want in identity.items():
            have = attrs.get(key)
            same = (schema.canonical_json(have) == schema.canonical_json(want)) if key == "config" \
                else have == want
            if not same:
                what = "config differs" if key == "config" else f"{key} is {have!r}, this writer has {want!r}"
                raise StoreMismatchError(f"store {self.path!r} belongs to another run or layout ({what}).{fix}")

    # ------------------------------------------------------------------ resume
    def _resume(self, t: int):
        """Make steps >= t of this rank absent on disk so that they are rewritten, never counted twice."""
        if self._last_step is not None:
            raise StoreError("resume (resume_step / load_state_dict) must come before the first "
                               "write_step of this writer")
        if not 0 <= t <= self.layout.max_steps:
            raise StoreError(f"resume step {t} outside [0, max_steps={self.layout.max_steps}]")
        if self._committed < t - 1 and self._committed >= 0:
            warnings.warn(f"rank {self.rank}: the store holds steps only through {self._committed} "
                          f"but the run resumes at {t}; steps {self._committed + 1}..{t - 1} of this "
                          "rank are missing (was flush() called at the checkpoint?)", stacklevel=3)
        try:
            self._clear_from(t)
        except OSError as err:
            raise StoreWriteError(f"resuming the store {self.path!r} at step {t} failed: {err}; fix the cause "
                                  "(disk space, permissions) and resume again") from err
        self._resumed = True

    def _clear_from(self, t: int):
        a, c = self._arrays, self.layout.steps_per_chunk
        stale = max(self._committed, self._hwm)  # last step any chunk of ours may hold
        # First forget the stale steps (a crash from here on can no longer make them count) ...
        if self._committed > t - 1:
            a[COMMITTED][self.rank:self.rank + 1] = np.array([t - 1])
            self._note(COMMITTED, (self.rank,))
            self._committed = t - 1
        # ... then rebuild the chunk row of step t from disk and overwrite every stale chunk row.
        row = t // c
        blk = _Block.empty(row, self.layout, with_steps=self.rank == 0)
        keep = t - row * c
        if keep and row * c <= stale:
            for name, buf in blk.arrays.items():
                src = a[name]
                idx = (slice(row * c, row * c + c), self._cols) if name in SLOT_ARRAYS \
                    else (slice(row * c, row * c + c),)
                buf[:keep] = src[idx][:keep]
            blk.dirty = True
        if stale >= 0:
            for r in range(row, stale // c + 1):
                self._write_block(blk if r == row else _Block.empty(r, self.layout, self.rank == 0),
                                  update_hwm=False)
            self._hwm = t - 1
            a[WRITTEN][self.rank:self.rank + 1] = np.array([t - 1])
            self._note(WRITTEN, (self.rank,))
        self._buf = blk

    def state_dict(self) -> dict:
        """Flushes, then returns what a checkpoint needs to resume this writer."""
        committed = self.flush()
        return {"format": schema.FORMAT_NAME, "run_id": self.run_id, "rank": self.rank,
                "world_size": self.world_size, "next_step": committed + 1}

    def load_state_dict(self, sd: dict):
        """Resume at sd['next_step'] (steps >= it are rewritten); call before the first write_step."""
        if not isinstance(sd, dict) or "next_step" not in sd:
            raise StoreError(f"load_state_dict needs the dict that ScoreWriter.state_dict() returned (with "
                             f"'next_step'), got {type(sd).__name__}")
        if sd.get("run_id") != self.run_id:
            raise StoreError(f"state_dict is of run {sd.get('run_id')!r}, this writer is {self.run_id!r}")
        if sd.get("world_size", self.world_size) != self.world_size:
            raise StoreError("state_dict was saved with another world_size; the store layout "
                             "depends on it")
        self._resume(_int("next_step", sd["next_step"]))

    # ------------------------------------------------------------------ writing
    def write_step(self, step: int, sample_ids, scores, sample_loss=None, *, lr=np.nan,
                   loss=np.nan, target_losses=None, residual=np.nan, wall_time=np.nan):
        """Buffer this rank's scores of one optimizer step; returns without waiting for the disk."""
        self._check_open()
        step = _int("step", step)
        L = self.layout
        ids = _numpy(sample_ids, name="sample_ids")
        if ids.ndim != 1:
            raise StoreError(f"sample_ids must be 1-D, got shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise StoreError(f"sample_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        b = ids.size
        sc = _numpy(scores, np.float32, "scores")
        if sc.ndim == 1 and L.num_targets == 1:
            sc = sc[:, None]
        if sc.shape != (b, L.num_targets):
            raise StoreError(f"scores must have shape [len(sample_ids), K] = [{b}, {L.num_targets}] "
                             f"(targets {self.targets}), got {tuple(sc.shape)}")
        sl = None if sample_loss is None else _numpy(sample_loss, np.float32, "sample_loss")
        if sl is not None and sl.shape != (b,):
            raise StoreError(f"sample_loss must have shape [{b}], got {tuple(sl.shape)}")
        tl = None if target_losses is None else _numpy(target_losses, np.float64, "target_losses").reshape(-1)
        if tl is not None and tl.size != L.num_targets:
            raise StoreError(f"target_losses must have {L.num_targets} values, got {tl.size}")
        if b > L.slots_per_rank:
            raise StoreError(f"step {step}: {b} samples on rank {self.rank} but slots_per_rank is "
                             f"{L.slots_per_rank}; create the store with slots_per_rank >= the local "
                             "batch (all micro-batches of one optimizer step)")
        if b and (ids.min() < 0 or ids.max() >= L.num_samples):
            bad = ids[(ids < 0) | (ids >= L.num_samples)]
            raise StoreError(f"step {step}: sample ids {bad[:5].tolist()} outside [0, num_samples="
                             f"{L.num_samples}); ids must index the dataset")
        if b > 1:
            s = np.sort(ids)
            dup = s[1:][s[1:] == s[:-1]]
            if dup.size:
                raise StoreError(f"step {step}: sample ids {np.unique(dup)[:5].tolist()} occur more "
                                 "than once on this rank; merge their scores before writing")
        nxt = 0 if self._last_step is None else self._last_step + 1
        if step < nxt and self._last_step is not None:
            raise StoreError(f"step {step} written after step {self._last_step}: steps must "
                             "increase; to rewrite a step, resume with resume_step")
        if not 0 <= step < L.max_steps:
            raise StoreError(f"step {step} outside [0, max_steps={L.max_steps}); create the store "
                             "with a larger max_steps")

        # Valid: from here on nothing raises for this step's data.
        if not self._resumed:
            self._resume(step)  # first write: anything stale at >= step from an earlier run goes
        c = L.steps_per_chunk
        row, i = divmod(step, c)
        if self._buf is None or row != self._buf.row:
            if self._buf is not None and self._buf.dirty:
                self._submit(self._buf)
            self._buf = _Block.empty(row, L, with_steps=self.rank == 0)
        A = self._buf.arrays
        A["sample_id"][i, :b] = ids
        A["sample_id"][i, b:] = -1
        A["score"][i, :b] = sc
        A["score"][i, b:] = np.nan
        A["sample_loss"][i, :b] = np.nan if sl is None else sl
        A["sample_loss"][i, b:] = np.nan
        if self.rank == 0:
            A["lr"][i], A["loss"][i] = lr, loss
            A["residual"][i], A["wall_time"][i] = residual, wall_time
            A["target_loss"][i] = np.nan if tl is None else tl
        self._buf.dirty = True
        self._before_last, self._last_step = self._last_step, step

    def retract(self, step: int):
        """Forget `step`, the last step given to write_step, while it is still buffered (its optimizer step
        failed after the scores were buffered): the store ends as if it had never been written."""
        c = self.layout.steps_per_chunk
        if step != self._last_step or self._buf is None or self._buf.row != step // c:
            raise StoreError(f"retract({step}): only the last written step ({self._last_step}) can be retracted, "
                             "before it is flushed")
        i = step - self._buf.row * c
        for name, buf in self._buf.arrays.items():
            buf[i] = FILL[name]
        self._last_step = self._before_last

    def check_healthy(self):
        """Raise StoreWriteError if the writer thread failed, StoreClosedError after close()."""
        self._check_open()

    def flush(self, durable: bool = False) -> int:
        """Write everything buffered, wait for the disk, record and return this rank's last committed step.

        `durable=True` (at training checkpoints): also fsync every chunk this rank wrote since its last durable
        flush (the first time: the whole store), then the committed marker, so that a power loss cannot leave
        a committed step whose chunks were still in the page cache."""
        self._check_open()
        if self._buf is not None and self._buf.dirty:
            self._submit(self._buf.copy())  # the step rows keep filling the original
            self._buf.dirty = False
        self._queue.join()
        self._raise_thread_error()
        moved = self._last_step is not None and self._last_step != self._committed
        if durable:
            self._sync()  # the chunks first ...
        if moved:
            try:
                self._arrays[COMMITTED][self.rank:self.rank + 1] = np.array([self._last_step])
            except OSError as err:
                raise StoreWriteError(f"recording the committed step in {self.path!r} failed: {err}; steps "
                                      f"through {self._committed} stay committed") from err
            self._note(COMMITTED, (self.rank,))
            self._committed = self._last_step
        if durable:
            self._sync()  # ... then the marker
        return self._committed

    def _note(self, name: str, coords: tuple):
        """Remember the file of chunk `coords` of array `name` for the next durable flush."""
        key = self._arrays[name].metadata.encode_chunk_key(coords)
        self._unsynced.add(os.path.join(name, *key.split("/")))

    def _sync(self):
        """fsync the files this rank wrote since the last durable flush (the first time: every file of the
        store) and every folder from theirs up to the store's: new rows make new folders, and zarr writes
        by rename, so the entries live in the folders."""
        root = os.path.abspath(self.path)
        try:
            if self._synced_all:
                files = [os.path.join(root, rel) for rel in sorted(self._unsynced)]
            else:
                files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if not f.endswith(".partial")]
            folders = set()
            for f in files:
                try:
                    _fsync(f)
                except FileNotFoundError:  # an all-missing chunk is deleted, not written (or another rank's moved)
                    pass
                d = os.path.dirname(f)
                while d not in folders and len(d) >= len(root):
                    folders.add(d)
                    d = os.path.dirname(d)
            for d in sorted(folders, key=len, reverse=True):
                try:
                    _fsync(d, directory=True)
                except FileNotFoundError:  # the folder of chunks that were never written
                    pass
        except OSError as err:
            raise StoreWriteError(f"fsync of the store {self.path!r} failed: {err}") from err
        self._unsynced.clear()
        self._synced_all = True

    def close(self):
        """Flush, stop the writer thread and (by default) rebuild the totals with all ranks."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self.reduce_on_close:
            from .reduce import BarrierComm, reduce_store

            kw = {} if self.reduce_memory_bytes is None else {"memory_bytes": self.reduce_memory_bytes}
            self._barrier()  # every rank's log is on disk
            reduce_store(self.path, processes=self.reduce_processes,
                         comm=BarrierComm(self.rank, self.world_size, self._barrier), **kw)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # do not hang other ranks in a collective reduce while unwinding an error
            self.reduce_on_close = False
            try:
                self.close()
            except Exception:  # noqa: BLE001  (the error being unwound is the one to report)
                pass
        return False

    # ------------------------------------------------------------------ background thread
    def _submit(self, blk: _Block):
        self._raise_thread_error()
        self._queue.put(blk)  # blocks only when queue_chunks rows already wait: bounded memory

    def _drain(self):
        while True:
            blk = self._queue.get()
            try:
                if blk is None:
                    return
                if self._error is None:
                    self._write_block(blk)
            except BaseException as e:  # noqa: BLE001  (reported to the training thread at its next call)
                self._error = e
            finally:
                self._queue.task_done()

    def _write_block(self, blk: _Block, update_hwm: bool = True):
        c = self.layout.steps_per_chunk
        rows = slice(blk.row * c, blk.row * c + c)
        if update_hwm and blk.row * c + c - 1 > self._hwm:
            # Announce before writing: after a crash, no chunk of ours lies beyond this mark.
            self._hwm = blk.row * c + c - 1
            self._arrays[WRITTEN][self.rank:self.rank + 1] = np.array([self._hwm])
            self._note(WRITTEN, (self.rank,))
        for name, buf in blk.arrays.items():
            idx = (rows, self._cols) if name in SLOT_ARRAYS else (rows,)
            self._arrays[name][idx] = buf
            lead = (blk.row, self.rank) if name in SLOT_ARRAYS else (blk.row,)
            self._note(name, lead + (0,) * (buf.ndim - len(lead)))

    def _raise_thread_error(self):
        if self._error is not None:
            raise StoreWriteError(f"the store writer thread failed: {self._error!r}; every step committed before "
                                  "it is intact (resume from the last checkpoint)") from self._error

    def _check_open(self):
        if self._closed:
            raise StoreClosedError("the ScoreWriter is closed")
        self._raise_thread_error()
