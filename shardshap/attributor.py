"""`Attributor`: runs one optimizer step and returns every sample's In-Run Data Shapley value.

This module is the orchestration of a step; the pieces live in their own modules: the backend contract
(backends/), the estimators (estimators/), the target pass (target.py), the input and completeness
checks (checks.py), the per-sample products (ghost/) and the store (store/).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.profiler import record_function

from . import __version__, estimators
from ._hardware import warn_if_bf16_is_emulated
from .backends import detect
from .checks import HostRead, Verdicts, check_completeness, check_ids, check_loss
from .compiled import compile_ready, is_compiled, uncompiled
from .config import Config
from .errors import AttributionError, ConfigError, ShardshapError, StoreError, UnsupportedEngine
from .estimators.owen import is_cold, owen_cold_start
from .estimators.predict import predicted_grad
from .foreach import chunks, dots
from .ghost import Capture, plan
from .ghost.capture import exact_math
from .optim.base import scalar
from .target import evaluate_targets, target_autocast, target_gradients, target_mode
from .types import Recording, StepResult

_UNSET: Any = object()  # "not given" (None is a valid value for targets)
SUBSPACE_WARN_ENERGY = 0.8  # stream_predictor='subspace': below this kept energy of a W, warn (once)


def _as_ids(x, j: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() not in (1, 2) or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise AttributionError(f"sample_ids of micro-batch {j} must be a 1-D integer tensor or list (one id per "
                               "sample), or an integer tensor shaped like train_loss's output ([b, positions]: "
                               "per-position ids, -1 where a position does not count), got dtype "
                               f"{t.dtype} and shape {tuple(t.shape)}")
    return t.to(torch.int64).cpu()


def _players(ids: list[torch.Tensor]) -> int:
    """The players of a step's micro-batches' ids: samples, or the distinct ids of counted positions."""
    if ids[0].dim() == 1:
        return sum(len(i) for i in ids)
    return len(torch.unique(torch.cat([i[i >= 0] for i in ids])))


def _counted(ids: torch.Tensor) -> torch.Tensor:
    """[b, L] bool: the positions of per-position ids that count."""
    return ids >= 0


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype of the autocast enclosing this call on `device`, or None."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _micro_batches(batch, sample_ids):
    """Normalise (batch, ids) or ([b1, b2, ...], [ids1, ids2, ...]) to two lists of micro-batches."""
    def is_id_list(x):
        return torch.is_tensor(x) or (isinstance(x, (list, tuple)) and all(isinstance(v, int) for v in x))
    if isinstance(sample_ids, (list, tuple)) and sample_ids and not is_id_list(sample_ids):
        # a tuple is one batch (e.g. (inputs, labels)); micro-batches come as a list
        if not isinstance(batch, list) or len(batch) != len(sample_ids):
            raise AttributionError(
                f"gradient accumulation: sample_ids is a list of {len(sample_ids)} id lists, so batch must be a "
                f"list of as many micro-batches (got {type(batch).__name__}"
                f"{' of length %d' % len(batch) if isinstance(batch, (list, tuple)) else ''})")
        micro_ids = list(sample_ids)
        micro = list(batch)
    elif isinstance(sample_ids, (list, tuple)) and not sample_ids:
        raise AttributionError("the step has no samples (empty sample_ids): pass at least one sample")
    else:
        micro_ids, micro = [sample_ids], [batch]
    ids = [_as_ids(x, j) for j, x in enumerate(micro_ids)]
    empty = [j for j, i in enumerate(ids) if len(i) == 0]
    if empty:
        raise AttributionError(f"the step has no samples in micro-batch {empty[0]} (empty sample_ids): pass at "
                               "least one sample per micro-batch")
    return micro, ids


class _GatheredW(Mapping):
    """id(param) -> full W [K, *shape], gathered from the ranks' owned elements each time it is read.

    Capture.products reads one module's entries at a time, so under FSDP2/ZeRO-3 only that module's W is
    ever whole on a rank (bounded memory); every rank reads in the same module order (collectives)."""

    def __init__(self, backend, shards, owned, params, K, dtype):
        self.backend, self.shards, self.owned, self.params, self.K, self.dtype = \
            backend, shards, owned, params, K, dtype

    def __getitem__(self, pid):
        if self.owned[pid] is None:  # not moved this step, or no target depends on it
            p = self.params[pid]
            return torch.zeros(self.K, *self.backend.full_shape(p), dtype=self.dtype, device=p.device)
        return self.backend.gather(self.shards[pid], self.owned[pid])

    def __iter__(self):
        return iter(self.owned)

    def __len__(self):
        return len(self.owned)


@dataclass
class _StreamedStep:
    """What the streaming schedule fixed before the step's training forward."""
    W: Optional[Mapping]  # id(param) -> full W [K, *shape] the in-backward products use (dense on read);
    #                       None for stream_predictor='subspace' (sketches in the backward, W after it)
    target_loss: Optional[torch.Tensor]
    lowrank: dict         # Capture.stream's low-rank info (empty for exact products)
    bytes_sent: int       # communication of the target pass and the W gathers

    @property
    def sketched(self) -> bool:
        return self.W is None


class Attributor(Stateful):
    """Values every training sample during training: `step()` replaces
    `zero_grad(); loss.backward(); optimizer.step()` and returns the step's per-sample values.

    train_loss(model, batch) -> Tensor[b] per-sample losses; target_loss(model, targets) -> Tensor[K]
    (or a 0-d tensor for one target). Training is not changed: parameters and optimizer state after
    `step()` equal those of the plain step on the same batch.

    Loops that own their backward and optimizer step use the low-level API instead (train_loss may then
    be None): `with attr.record(ids): loss = ...; loss.backward()` for each micro-batch, then
    `attr.attribute(targets)` before `optimizer.step()` (docs/training.md).

    Every error raised is a `shardshap.ShardshapError`; when `step` or `attribute` raises, the optimizer
    has not stepped, the gradients are zeroed and the store holds nothing of the step. With
    Config.check_timing='next-step' (accelerators' default) a failed check of values is raised one step
    late, by the next step (refused so) or flush/close; the failed step has trained and is not stored.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loss: Callable[[nn.Module, Any], torch.Tensor],
                 target_loss: Callable[[nn.Module, Any], torch.Tensor],
                 config: Optional[Config] = None, *, store: Optional[str] = None,
                 run_id: Optional[str] = None, overwrite: bool = False):
        self.config = config if config is not None else Config()
        if not isinstance(self.config, Config):
            raise ConfigError(f"config must be a shardshap.Config, got {type(self.config).__name__}")
        if not isinstance(model, nn.Module):
            raise AttributionError(f"model must be a torch.nn.Module (or a DDP / FSDP2 / DeepSpeed-wrapped one), "
                                   f"got {type(model).__name__}")
        if store is not None and self.config.num_samples is None:
            raise AttributionError("writing a store needs the size of the training set: set "
                                   "Config(num_samples=N) (sample ids are in [0, N))")
        if not callable(target_loss) or (train_loss is not None and not callable(train_loss)):
            raise AttributionError("train_loss and target_loss must be callables: train_loss(model, batch) -> "
                                   "Tensor[b], target_loss(model, targets) -> Tensor[K]")
        self.backend = detect(model)
        self._compiled = is_compiled(model)
        optimizer = self.backend.resolve_optimizer(optimizer)
        self.model, self.module, self.optimizer = model, self.backend.module, optimizer
        self.train_loss, self.target_loss = train_loss, target_loss
        self.update_rule = self.backend.update_rule(optimizer)
        self.estimator = estimators.get(self.config.estimator)
        self.estimator.check(self.update_rule, optimizer)
        self.plan = plan(uncompiled(self.module), self.config.exclude, trainable=self.backend.trainable(optimizer))
        if not self.plan.params:
            raise AttributionError("no trainable parameter to attribute: every parameter is frozen, outside "
                                   "the optimizer, or excluded")
        any_f64 = any(p.dtype == torch.float64 for p in self.module.parameters())
        self.dtype = {"float32": torch.float32, "float64": torch.float64}.get(
            self.config.compute_dtype, torch.float64 if any_f64 else torch.float32)
        cache_dtype = {None: None, "bfloat16": torch.bfloat16}[self.config.cache_dtype]
        self.capture = Capture(self.plan, cache_dtype=cache_dtype, compute_dtype=self.dtype)
        self.capture.model_parallel = self.backend.model_parallel()
        if self.capture.model_parallel is not None:
            _check_model_parallel_config(self.config)
        self._device = next(iter(self.plan.params.values())).device
        if self.config.cache_dtype is not None or target_autocast(self.config, self._device) is not None:
            warn_if_bf16_is_emulated(self._device)
        self.step_index = 0
        self.store_path, self.overwrite = store, overwrite
        self.run_id = run_id or "run-" + hashlib.sha256(
            json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        self._writer = None  # opened at the first step, before it trains (the local batch size is known then)
        self._resume_step: Optional[int] = None
        self._recorded: list[Recording] = []  # this step's micro-batches so far
        self._targets = _UNSET  # the targets given when this step began
        self._stream: Optional[_StreamedStep] = None  # streaming: what the step's W was fixed with
        self._previous_grad: dict[int, torch.Tensor] = {}  # stream_predictor='previous': last clipped gradient
        self._bases: Optional[dict] = None  # stream_predictor='subspace': id -> Basis from the last step's W
        self._warned_subspace = False
        self._probed = False  # the first step of step() checked that every module is batch-first
        self._reads = HostRead()  # this step's checks and values, brought to the host at once
        self._user_autocast: Optional[torch.dtype] = None  # the autocast the user's step runs under, if any
        timing = self.config.check_timing or ("before-step" if self._device.type == "cpu" else "next-step")
        self._late_checks = timing == "next-step"
        # next-step checks: this step's verdicts and store values in flight (and whether to warn of the kept
        # energies among them), then with the step index and result until the next step reads them
        self._sent: Optional[tuple[Verdicts, bool]] = None
        self._pending: Optional[tuple[int, tuple[Verdicts, bool], StepResult]] = None

    # ------------------------------------------------------------------ public API
    def step(self, batch, sample_ids, targets) -> StepResult:
        """One optimizer step over `batch` (or a list of micro-batches: one step, one game)."""
        if self.train_loss is None:
            raise AttributionError("step() needs train_loss(model, batch) -> per-sample losses; without it use "
                                   "the low-level API: attr.record(ids) around your forward/backward, then "
                                   "attr.attribute(targets) before optimizer.step()")
        t0 = time.perf_counter()
        opt, backend = self.optimizer, self.backend
        backend.zero_grad(opt)
        written = False
        try:
            with compile_ready(self._compiled):
                micro, ids = _micro_batches(batch, sample_ids)
                per_position = ids[0].dim() == 2
                c = 1.0 / self._loss_count(ids) if self.config.reduction == "mean" else 1.0
                self._check_store_fits(_players(ids))
                self._begin_step(targets)
                for j, (mb, mids) in enumerate(zip(micro, ids)):
                    last = j == len(micro) - 1
                    # (one process only: a partial backward through DDP / FSDP / DeepSpeed could disturb their hooks)
                    probe = (j == 0 and not self._probed and len(mids) > 1 and not backend.distributed
                             and not backend.owns_backward)
                    with record_function("shardshap.forward_backward"), self._record(mids) as rec, \
                            backend.no_sync(last):
                        with self.capture.probing() if probe else nullcontext() as outputs:
                            per_sample = self.train_loss(self.model, mb)
                        check_loss(per_sample, mids, j, self._reads)
                        if per_position:  # (-1 positions may hold anything, even NaN: left out, not multiplied)
                            per_sample = torch.where(_counted(mids).to(per_sample.device), per_sample, 0)
                        if probe:
                            self.capture.check_batch_first(per_sample[0].sum(), outputs)
                            self._probed = True
                        if len(micro) == 1 and self.config.reduction == "mean" and not per_position:
                            backend.backward(per_sample.mean())  # bit-identical to the plain step
                        else:
                            backend.backward(per_sample.sum() * c)
                        rec.sample_loss = per_sample.detach()
                    backend.after_micro_batch(last)
                result = self._attribute_recorded(targets, grad_norm=None)
                result.metadata["seconds"] = time.perf_counter() - t0
                written = self._write(result)  # validated and buffered before training moves
                with record_function("shardshap.optimizer_step"):
                    backend.optimizer_step(opt)
        except BaseException as err:
            backend.zero_grad(opt)  # nothing half-applied: no step, no leftover gradient, no recording
            self._discard()
            if written:
                self._writer.retract(self.step_index)
            if self._pending is not None and self._pending[0] == self.step_index:  # (next-step checks)
                self._pending = None
            _name_the_culprit(err)
            raise
        self.step_index += 1
        return result

    def _loss_count(self, ids: list[torch.Tensor]) -> float:
        """What a 'mean' training loss divides by: this rank's samples (the engines average over ranks), or
        for per-position ids the counted positions of the whole step over all ranks, times the ranks."""
        if ids[0].dim() == 1:
            return float(sum(len(i) for i in ids))
        local = torch.tensor([sum(int(_counted(i).sum()) for i in ids)], dtype=torch.int64)
        total = float(self.backend.all_reduce_sum(local).item())  # (every rank raises together below)
        if total == 0:
            raise AttributionError("per-position sample_ids are -1 everywhere in the step: no position counts")
        return total / self.backend.dp_size

    # ------------------------------------------------------------------ low-level API (user-owned loops)
    @contextmanager
    def record(self, sample_ids, targets=_UNSET):
        """Capture one micro-batch of your own training forward (and the backward that follows it, inside
        or after the block): `with attr.record(ids) as rec: loss = ...; loss.backward()`. Set
        `rec.sample_loss` (Tensor[b]) to store per-sample losses. Call once per micro-batch, in order.
        Under schedule='streaming' the target pass runs before the training forward: give `targets` to the
        first record() of each step (and then call attribute() without them). A DeepSpeed engine's loop calls
        `engine.backward(loss)` in the block and attribute() before the engine.step() of the accumulation
        boundary (the one that steps; DeepSpeed clips there)."""
        if not self._recorded:
            if self.config.schedule == "streaming" and targets is _UNSET:
                raise AttributionError("schedule='streaming' takes the target pass before the training forward: "
                                       "pass the targets to the first record() of each step, "
                                       "`attr.record(ids, targets=...)`")
            with self._refused_leaves_nothing(), compile_ready(self._compiled):
                self._begin_step(targets)
        with self._record(sample_ids) as rec:
            yield rec

    @contextmanager
    def _record(self, sample_ids):
        try:  # any failure drops the whole step's recordings: the next step starts clean
            rec = Recording(_as_ids(sample_ids, len(self._recorded)))
            if rec.sample_ids.dim() == 2 and self.backend.mp_group is not None:
                raise UnsupportedEngine("per-position sample_ids (packed documents) are not supported under tensor "
                                        "parallelism yet; pass one id per sample")
            if len(rec.sample_ids) == 0:
                raise AttributionError("the step has no samples (empty sample_ids): pass at least one sample "
                                       "per micro-batch")
            if self.store_path is not None:
                check_ids(torch.cat([r.sample_ids.reshape(-1) for r in self._recorded + [rec]]),
                          self.config.num_samples, per_position=rec.sample_ids.dim() == 2)
            self._recorded.append(rec)
            with self.capture.recording(rec.sample_ids, len(self._recorded) - 1), \
                    compile_ready(self._compiled):
                yield rec
        except BaseException:
            self._discard()
            raise

    def attribute(self, targets=_UNSET, grad_norm: Optional[float] = None) -> StepResult:
        """Values of the step about to be taken, from the micro-batches recorded since the last step. Call
        it after the last backward and BEFORE `optimizer.step()`; it never steps the optimizer.

        Clipping (Config.max_grad_norm): leave `grad_norm=None` and do not clip yourself: the gradients are
        clipped here, in place, exactly as torch.nn.utils.clip_grad_norm_ would. If you clipped already,
        pass the total norm that clip_grad_norm_ returned. On an error the gradients are zeroed, so that
        a following optimizer.step() changes nothing."""
        t0 = time.perf_counter()
        if not self._recorded:
            raise AttributionError("attribute() found no recorded micro-batch: wrap each micro-batch's forward "
                                   "in `with attr.record(sample_ids):` before its backward")
        with self._refused_leaves_nothing():
            self.backend.check_before_step()
            if targets is _UNSET:
                targets = self._targets
            if targets is _UNSET:
                raise AttributionError("attribute() needs the targets (or, under schedule='streaming', the first "
                                       "record() of the step has them)")
            if self._stream is not None and targets is not self._targets:
                raise AttributionError("schedule='streaming' took this step's target pass with the targets given "
                                       "to record(); call attribute() without targets (or with the same object)")
            self._check_store_fits(self.capture.players.n)
            with compile_ready(self._compiled):
                result = self._attribute_recorded(targets, grad_norm)
            result.metadata["seconds"] = time.perf_counter() - t0
            self._write(result)
        self.step_index += 1
        return result

    @contextmanager
    def _refused_leaves_nothing(self):
        """Low-level API: on any error the gradients are zeroed (the user's optimizer.step() then changes
        nothing), the step's recordings are dropped and the error names its culprit."""
        try:
            yield
        except BaseException as err:
            self.backend.zero_grad(self.optimizer)
            self._discard()
            _name_the_culprit(err)
            raise

    def state_dict(self) -> dict:
        """The attribution part of a training checkpoint (flushes the store first). The Attributor is a
        torch.distributed.checkpoint `Stateful`: `dcp.save({"attr": attr, ...})` works as for a model."""
        self._settle()
        state = {"step": self.step_index, "run_id": self.run_id, "config": self.config.to_dict()}
        if self._writer is not None:
            state["store"] = self._writer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at the checkpoint's step: the store rewrites every step from there on."""
        if not isinstance(state, Mapping) or "step" not in state:
            raise AttributionError("load_state_dict needs the dict that Attributor.state_dict() returned (with "
                                   f"'step'), got {type(state).__name__}")
        if state.get("run_id", self.run_id) != self.run_id:
            raise AttributionError(f"checkpoint of run {state['run_id']!r}, but this Attributor is run "
                                   f"{self.run_id!r}: pass run_id= or the same config")
        self.step_index = int(state["step"])
        self._resume_step = self.step_index
        self._pending = None  # (a step after the checkpoint: rewritten from there on)
        self._bases = None  # (found again from the resumed state's W at the next streamed step)
        if self._writer is not None:
            self._writer.load_state_dict({**state["store"], "next_step": self.step_index})

    def flush(self, durable: bool = False) -> None:
        """Make every step written so far committed in the store (a training checkpoint calls it);
        `durable=True` also fsyncs the written files, so that they survive a power loss."""
        self._settle()
        if self._writer is not None:
            self._writer.flush(durable=durable)

    def close(self) -> None:
        """Flush and finalise the store (per-sample totals), and remove the hooks from the model."""
        try:
            self._settle()  # (its error is raised once the store is closed)
        finally:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                self._writer = None
                self.capture.remove()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self._settle()  # the last step's row if its checks passed; the error in flight is the one raised
            except ShardshapError:
                pass
        if exc_type is not None and self._writer is not None:
            self._writer.__exit__(exc_type, exc, tb)  # flush what is there; no collective while unwinding
            self._writer = None
        self.close()

    @property
    def excluded(self) -> list[str]:
        return list(self.plan.excluded)

    # ------------------------------------------------------------------ internals
    def _attribute_recorded(self, targets, grad_norm) -> StepResult:
        self._user_autocast = _autocast_dtype(self._device)  # (target_dtype='auto' may take it)
        with exact_math(self._device):  # attribution's math runs without the user's autocast
            return self._attribute_or_discard(targets, grad_norm)

    def _attribute_or_discard(self, targets, grad_norm) -> StepResult:
        try:
            if self._compiled and self.capture.tapped == 0:
                raise AttributionError(
                    "the compiled model ran without shardshap's hooks: dynamo reused graphs compiled before the "
                    "Attributor registered them (torch._dynamo skips hook guards by default, so graphs of another "
                    "instance of the same model, or of this one before the Attributor existed, are taken as they "
                    "are). Create the Attributor before the first training forward, or call torch._dynamo.reset() "
                    "(or set torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling).")
            return self._attribute(targets, self.capture.players.ids, self._player_losses(), grad_norm)
        except Exception:
            self._reads.raise_failed()  # a failed check (a non-finite loss, say) is the cause worth naming
            raise
        finally:
            self._discard()

    def _player_losses(self) -> torch.Tensor:
        """[players]: each sample's training loss, or each document's mean over its counted positions (NaN
        where the micro-batch's losses were not recorded)."""
        players = self.capture.players
        losses = [r.sample_loss for r in self._recorded]
        device = next((x.device for x in losses if x is not None), torch.device("cpu"))
        parts = []
        for x, mp in zip(losses, players.micro):
            if x is None:
                parts.append(torch.full((mp.m,), math.nan, device=device))
            elif mp.per_position:
                counted = (mp.local >= 0).to(x.device)
                parts.append(torch.zeros(mp.m + 1, dtype=x.dtype, device=x.device).index_add_(
                    0, torch.where(counted, mp.local.to(x.device), mp.m).reshape(-1),
                    torch.where(counted, x.detach(), 0).reshape(-1))[:mp.m])
            else:
                parts.append(x.detach().reshape(-1))
        total = players.merge(parts, (), torch.float64, device)
        mp = self.capture.model_parallel
        if mp is not None and mp.tokens_split:  # (each rank's losses cover its own tokens)
            total = self.backend.all_reduce(total, over="mp")
        if players.per_position:
            total = total / players.counted_positions().to(device)
        return total.to(next((x.dtype for x in losses if x is not None), torch.float32))

    def _step_loss(self, sample_loss: torch.Tensor) -> torch.Tensor:
        """The step's training loss on this rank (Config.reduction; NaN where losses were not recorded): over
        the samples, or over the counted positions of per-position ids."""
        players = self.capture.players
        if players.per_position:
            counted = players.counted_positions().to(sample_loss.device, sample_loss.dtype)
            total = (sample_loss * counted).sum()
            return total / counted.sum() if self.config.reduction == "mean" else total
        return sample_loss.mean() if self.config.reduction == "mean" else sample_loss.sum()

    def _discard(self) -> None:
        self._recorded = []
        self._targets, self._stream = _UNSET, None
        self.capture.clear()
        self._reads.clear()

    def _begin_step(self, targets) -> None:
        """Before the step's first training forward: under schedule='streaming' (unless the step is a cold
        one that Owen's start takes, cached), fix W and take products in the backward from now on."""
        self._targets = targets
        self._user_autocast = _autocast_dtype(self._device)  # (a streaming predictor's target pass runs here)
        cfg = self.config
        if cfg.schedule != "streaming":
            return
        with record_function("shardshap.shards"):
            shards = self.backend.shards(self.optimizer, grads=False)
        if self.estimator.uses_cold_start and cfg.cold_start == "owen" and any(
                is_cold(self.update_rule, sh, cfg.cold_steps) for sh in shards.values()):
            return
        if cfg.stream_predictor == "subspace":
            self._stream = self._fix_subspace(targets, shards)
        else:
            self._stream = self._fix_stream(targets, shards)

    def _fix_subspace(self, targets, shards) -> "_StreamedStep":
        """stream_predictor='subspace': sketch in the bases of the previous step's W; the first step (or the first
        after a resume) finds them from the W that stream_predictor='momentum' would have used."""
        bytes_before = self.backend.bytes_sent
        if self._bases is None:
            W, _ = self._predicted_W(targets, shards, "momentum")
            self._bases = self.capture.bases(W, self.config.sketch_rank)
        self.capture.sketch(self._bases, self.dtype)
        return _StreamedStep(None, None, {}, self.backend.bytes_sent - bytes_before)

    def _fix_stream(self, targets, shards) -> "_StreamedStep":
        """The streaming schedule's W: the estimator frozen at the predicted batch gradient (clip factor 1;
        the real one scales the values at the end) and the target gradients at the predicted midpoint."""
        bytes_before = self.backend.bytes_sent
        W, target_loss = self._predicted_W(targets, shards, self.config.stream_predictor)
        lowrank, W = self.capture.stream(W, self.dtype, target_loss.numel(), rank=self.config.product_rank)
        return _StreamedStep(W, target_loss, lowrank, self.backend.bytes_sent - bytes_before)

    def _predicted_W(self, targets, shards, predictor: str):
        """(W gathered on read, target losses) at the batch gradient `predictor` predicts."""
        cfg, dtype, backend = self.config, self.dtype, self.backend
        shards = {pid: replace(sh, grad=predicted_grad(
            predictor, self.update_rule, sh, self._previous_grad.get(pid), dtype))
            for pid, sh in shards.items()}
        with record_function("shardshap.freeze"):
            frozen = self.estimator.freeze_all(self.update_rule, shards, 1.0, dtype, order=cfg.order,
                                               compiled=cfg.compile_math)
        h, target_loss = self._target_pass(targets, shards, frozen)
        K = target_loss.numel()
        attributed = list(self.plan.params.values())
        owned = _times_multiplier(frozen, attributed, h, shards)
        return _GatheredW(backend, shards, owned, {id(p): p for p in attributed}, K, dtype), target_loss

    def _target_pass(self, targets, shards, frozen):
        autocast = target_autocast(self.config, self._device, self._user_autocast, self.capture.small_tensors())
        with record_function("shardshap.target"), self.capture.paused(), \
                target_mode(self.module, self.config.target_mode):
            return target_gradients(
                self.backend, lambda: evaluate_targets(self.target_loss, self.module, targets, self.config, self._reads,
                                                       self._device, autocast),
                list(self.plan.params.values()), shards, frozen, self.config, self.dtype)

    def _clip(self, shards, grad_norm) -> float:
        """Clip the owned gradients as the engine does; the factor (remembering the clipped gradient for
        stream_predictor='previous')."""
        cfg = self.config
        with record_function("shardshap.clip"):
            if grad_norm is None or cfg.max_grad_norm is None:
                clip = self.backend.clip(shards, cfg.max_grad_norm)
            else:  # the caller clipped already (low-level API): clip_grad_norm_'s factor for that norm
                clip = min(1.0, cfg.max_grad_norm / (float(grad_norm) + 1e-6))
        if cfg.schedule == "streaming" and cfg.stream_predictor == "previous":
            self._previous_grad = {pid: sh.grad.to(self.dtype, copy=True) for pid, sh in shards.items()}
        return clip

    def _attribute(self, targets, sample_ids, sample_loss, grad_norm=None) -> StepResult:
        cfg, opt, dtype, backend = self.config, self.optimizer, self.dtype, self.backend
        bytes_before, mp_bytes_before = backend.bytes_sent, backend.bytes_sent_mp
        with record_function("shardshap.shards"):
            shards = backend.shards(opt)  # this rank's elements of every parameter the optimizer moves
        clip = self._clip(shards, grad_norm)
        sketched = self._stream is not None and self._stream.sketched
        if self._stream is not None and not sketched:
            return self._attribute_streamed(sample_ids, sample_loss, shards, clip)
        with record_function("shardshap.freeze"):
            frozen = self.estimator.freeze_all(self.update_rule, shards, clip, dtype, order=cfg.order,
                                               compiled=cfg.compile_math)
        attributed = list(self.plan.params.values())
        h, target_loss = self._target_pass(targets, shards, frozen)
        K = target_loss.numel()
        offset = None
        if self.estimator.uses_cold_start and cfg.cold_start == "owen":
            cold = [(p, hp) for p, hp in zip(attributed, h) if id(p) in shards and hp is not None
                    and is_cold(self.update_rule, shards[id(p)], cfg.cold_steps)]
            if cold:
                with record_function("shardshap.cold_start"):
                    offset = owen_cold_start(backend, self.capture, self.update_rule, shards, frozen, cold,
                                             clip, dtype)
        owned = _times_multiplier(frozen, attributed, h, shards)
        W = _GatheredW(backend, shards, owned, {id(p): p for p in attributed}, K, dtype)
        # Owen's cold steps take exact products: Adam's first updates are sign-like, without the low-rank
        # structure product_rank relies on (near initialisation a rank-16 LM head kept 0.955 of W: R 0.974)
        rank = cfg.product_rank if offset is None else None
        if (rank is not None and not sketched) or not backend.partitioned:
            W = {pid: W[pid] for pid in owned}  # low rank factorises every layer up front: materialise
        with record_function("shardshap.products"):
            if sketched:  # (and the next step's bases, from this step's W)
                grads = None if backend.partitioned else {pid: sh.grad.view(sh.param.shape)
                                                          for pid, sh in shards.items()}
                products, self._bases = self.capture.sketched(W, K, cfg.sketch_rank, grads)
            else:
                products = self.capture.products(W, dtype, rank=rank, num_targets=K)
        per_param = products.per_param
        stacked = self._stacked(per_param)
        backend.all_reduce(stacked, over="mp")  # (tensor parallelism: each rank computed its part of the products)
        if cfg.check_completeness:
            with record_function("shardshap.completeness"):
                check_completeness(backend, self.plan, per_param, stacked,
                                   products.W if isinstance(W, dict) or sketched else None,
                                   owned, shards, clip, dtype, self.capture.precision(), self._reads,
                                   products.grad_dots)
        scores = stacked.sum(0)
        metadata = {"schedule": "cached", "cold_start": offset is not None,
                    "bytes_sent": backend.bytes_sent - bytes_before}
        if backend.mp_group is not None:  # (part of bytes_sent: the partial products and sums, [players, K] each)
            metadata["bytes_sent_model_parallel"] = backend.bytes_sent_mp - mp_bytes_before
        if sketched:  # (never an Owen-cold step: those run cached)
            offset = self._outside_subspace(shards, owned, products, clip, K)
            metadata.update(schedule="streaming", sketch_energy=products.lowrank.pop("energy"),
                            bytes_sent=metadata["bytes_sent"] + self._stream.bytes_sent)
        if offset is not None:
            scores = scores + offset
        # (not on cold steps: Adam's start jumps)
        lags = sketched and not any(is_cold(self.update_rule, sh, cfg.cold_steps) for sh in shards.values())
        return self._result(scores, sample_ids, sample_loss, target_loss, clip, products.lowrank, lags, **metadata)

    def _stacked(self, per_param: dict[str, torch.Tensor]) -> torch.Tensor:
        """[params, players, K]: the products in per_param's order, as each sample's share of the global gradient
        (the engines average gradients over the data-parallel ranks)."""
        stacked = torch.stack(list(per_param.values()))
        return stacked / self.backend.dp_size if self.backend.distributed else stacked

    def _outside_subspace(self, shards, owned, products, clip, K: int) -> torch.Tensor:
        """Per-sample offset [K] that shares the part of <G, W> outside the sketches' subspace,
        <G, W - U U^T W V V^T>, equally among the step's samples: the values then add up to the cached
        schedule's (efficiency) and their differences are the sketches' (as Owen's offset does). Products.
        grad_dots gives <G, U U^T W V V^T> where the whole G is at hand; else the projection is multiplied out,
        a few parameters at a time."""
        backend = self.backend
        n = backend.all_reduce_sum(torch.tensor([self.capture.players.n], dtype=torch.int64, device=self._device))
        missing = torch.zeros(K, dtype=self.dtype, device=self._device)
        pids = [pid for pid in self.capture.sketchable() if pid in shards and owned[pid] is not None]
        for chunk in chunks([owned[pid].numel() for pid in pids]):
            chunk = [pids[j] for j in chunk]
            grads = [shards[pid].grad.to(self.dtype) for pid in chunk]
            if products.grad_dots is not None:
                projected = torch.stack([products.grad_dots[pid] for pid in chunk])
                outside = dots([owned[pid] for pid in chunk], grads) - projected
            else:
                projected = [backend.owned(shards[pid], products.W[pid], lead=1) for pid in chunk]
                outside = dots(torch._foreach_sub([owned[pid] for pid in chunk], projected), grads)
            missing = missing + outside.sum(0)
        return backend.reduce_partial(missing / clip) / n.to(self.dtype)

    def _attribute_streamed(self, sample_ids, sample_loss, shards, clip) -> StepResult:
        """The streaming schedule's values: the products taken in the backward, times the real clip factor."""
        backend, stream = self.backend, self._stream
        bytes_before = backend.bytes_sent
        per_param = self.capture.streamed()  # <c g_i, W> with W frozen at clip factor 1
        stacked = self._stacked(per_param)
        if self.config.check_completeness:
            with record_function("shardshap.completeness"):
                # <clipped gradient, W> / clip: the unclipped batch gradient, as the products use it
                check_completeness(backend, self.plan, per_param, stacked, stream.W, None, shards, clip, self.dtype,
                                   self.capture.precision(), self._reads)
        scores = stacked.sum(0) * clip
        return self._result(scores, sample_ids, sample_loss, stream.target_loss, clip, stream.lowrank, False,
                            bytes_sent=stream.bytes_sent + backend.bytes_sent - bytes_before, cold_start=False,
                            schedule="streaming")

    def _warn_if_subspace_lags(self, energy: dict[str, float], step: int) -> None:
        low = {n: e for n, e in energy.items() if e < SUBSPACE_WARN_ENERGY}
        if low and not self._warned_subspace:
            self._warned_subspace = True
            worst = ", ".join(f"{n} ({e:.2f})" for n, e in sorted(low.items(), key=lambda x: x[1])[:5])
            warnings.warn(f"step {step}: the previous step's subspace kept less than "
                          f"{SUBSPACE_WARN_ENERGY} of this step's W for {len(low)} weight(s): {worst}. Their values "
                          "are approximate beyond the usual; raise Config.sketch_rank (memory per sample: "
                          "(K * sketch_rank)^2 per weight) or use schedule='cached'. (Warned once; every step's "
                          "metadata has sketch_energy.)", stacklevel=3)

    def _result(self, scores, sample_ids, sample_loss, target_loss, clip, lowrank, lags: bool,
                **metadata) -> StepResult:
        """The step's StepResult, its checks read (or, next-step checks, sent on their way: `self._sent`).
        `lags`: warn if the subspaces kept too little of W (metadata sketch_energy)."""
        cfg = self.config
        energy = metadata.get("sketch_energy", {})  # (0-d tensors: read with the rest)
        if not self._late_checks:  # the step's one host sync: every check's verdict, the clip factor and the
            clip, *kept = self._reads.read(clip, *energy.values())  # subspaces' kept energies
            if energy:
                metadata["sketch_energy"] = dict(zip(energy, kept))
            if lags:
                self._warn_if_subspace_lags(metadata["sketch_energy"], self.step_index)
        loss = self._step_loss(sample_loss)
        if self.backend.distributed and self.capture.players.per_position:
            scores, sample_ids, sample_loss = self._merge_documents(scores, sample_ids, sample_loss)
        if self._late_checks:  # on their way to the host; read at the next step (_settle)
            self._sent = (self._reads.send(*(energy.values() if lags else ()),
                                           *((scores, sample_loss, loss, target_loss) if self._storing else ())), lags)
        return StepResult(
            scores=scores, sample_ids=sample_ids,
            loss=loss,
            sample_loss=sample_loss, step=self.step_index, lr=scalar(self.optimizer.param_groups[0]["lr"]),
            target_loss=target_loss, clip_factor=clip,
            metadata={"estimator": cfg.estimator, "order": cfg.order, "excluded": self.excluded,
                      "product_rank": cfg.product_rank, **metadata,
                      **{f"product_{k}": v for k, v in lowrank.items()}})

    def _merge_documents(self, scores, sample_ids, sample_loss):
        """Per-position ids under data parallelism: a document whose positions several ranks hold gets the sum
        of their parts (and the mean loss over all its positions), returned by the lowest of those ranks only
        (one all-gather of [players, K + 2] numbers and one of the ids)."""
        backend, players = self.backend, self.capture.players
        counted = players.counted_positions().to(scores.device, torch.float64)
        rows = torch.cat([scores.double(), counted[:, None], (sample_loss.double() * counted)[:, None]], 1)
        width = int(backend.all_reduce(torch.tensor([len(sample_ids)], dtype=torch.int64), "max").item())
        pad = width - len(sample_ids)
        ids = torch.cat([sample_ids, torch.full((pad,), -1, dtype=torch.int64)]).to(scores.device)
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        all_ids = torch.cat(backend.all_gather(ids)).cpu()
        all_rows = torch.cat(backend.all_gather(rows)).cpu()
        valid = all_ids >= 0
        distinct, which = torch.unique(all_ids[valid], return_inverse=True)
        merged = torch.zeros(len(distinct), rows.shape[1], dtype=torch.float64).index_add_(0, which, all_rows[valid])
        below = all_ids[:backend.dp_rank * width]
        mine = ~torch.isin(sample_ids, below[below >= 0])  # no lower rank has it
        at = torch.searchsorted(distinct, sample_ids[mine])
        K = scores.shape[1]
        out = merged[at].to(scores.device)
        return (out[:, :K].to(scores.dtype), sample_ids[mine],
                (out[:, K + 1] / out[:, K]).to(sample_loss.dtype))

    # ------------------------------------------------------------------ store
    def _check_store_fits(self, local_players: int) -> None:
        """Before a step trains: the store is healthy and has a slot for every local player."""
        slots = self.config.store_slots if self._writer is None else self._writer.layout.slots_per_rank
        if self.store_path is not None and slots is not None and local_players > slots:
            origin = ("Config.store_slots" if self.config.store_slots is not None
                      else "the widest rank's batch at the first step")
            raise StoreError(f"step {self.step_index}: {local_players} players (samples or documents) on rank "
                             f"{self.backend.dp_rank}, but the store has {slots} slots per rank ({origin}): keep "
                             "them at most that many, or write to a new store with a larger Config.store_slots")
        if self._writer is not None:
            self._writer.check_healthy()

    def _open_store(self, result: StepResult) -> None:
        """Create the store, or validate an existing one, at the first step (collective: every rank)."""
        from .store import ScoreWriter
        backend, local = self.backend, len(result.sample_ids)
        # the widest rank sets the slots; the sum is the global batch
        widest = int(backend.all_reduce(torch.tensor([local], dtype=torch.int64), "max").item())
        total = int(backend.all_reduce_sum(torch.tensor([local], dtype=torch.int64)).item())
        if self.config.store_slots is not None:
            widest = self.config.store_slots  # (a first step with more players was refused before it trained)
        self._writer = ScoreWriter(
            self.store_path, run_id=self.run_id, config=self.config.to_dict(),
            targets=self.config.target_names or [f"target{k}" for k in range(result.scores.shape[1])],
            num_samples=self.config.num_samples, slots_per_rank=widest,
            world_size=backend.dp_size, rank=backend.dp_rank,
            barrier=backend.barrier if backend.distributed else None,
            agree=backend.all_ok if backend.distributed else None, overwrite=self.overwrite,
            resume_step=self._resume_step,
            metadata={"estimator": self.config.estimator, "order": self.config.order,
                      "excluded": self.excluded, "global_batch": total,
                      "versions": {"shardshap": __version__, "torch": torch.__version__}})

    @property
    def _storing(self) -> bool:
        return self.store_path is not None and self.backend.mp_rank == 0  # (model-parallel ranks hold the same)

    def _write(self, result: StepResult) -> bool:
        """Buffer the step in the store, every check first (before the optimizer steps); True when
        something was buffered. With next-step checks: settle the previous step (raise its failed check, or
        buffer its row) and leave this one pending."""
        if self._late_checks:
            self._settle()
            self._pending, self._sent = (self.step_index, self._sent, result), None
            if self._storing and self._writer is None:
                with record_function("shardshap.store"):
                    self._open_store(result)  # (at the first step, as before-step checks do: the slots are fixed)
            return False
        if not self._storing:
            return False
        with record_function("shardshap.store"):
            if self._writer is None:
                self._open_store(result)
            self._writer.write_step(
                self.step_index, result.sample_ids, result.scores.float().cpu(), result.sample_loss.float().cpu(),
                lr=result.lr, loss=float(result.loss), target_losses=result.target_loss.cpu().numpy(),
                wall_time=result.metadata["seconds"])
        return True

    def _settle(self) -> None:
        """Next-step checks: read the pending step's verdicts (its copy has arrived long since) and buffer its
        row in the store, or raise its failed check's error (its row is dropped)."""
        if self._pending is None:
            return
        (step, (verdicts, lags), result), self._pending = self._pending, None
        values = verdicts.result(
            late=f" (step {step}; checks are read one step late, Config.check_timing='next-step': step {step} "
                 f"trained, nothing of it is in the store, and step {step + 1}, if any, was not taken)")
        if lags:
            energy = result.metadata["sketch_energy"]
            self._warn_if_subspace_lags(dict(zip(energy, values[:len(energy)])), step)
        if self._storing:
            scores, sample_loss, loss, target_loss = values[-4:]
            with record_function("shardshap.store"):
                self._writer.write_step(step, result.sample_ids, scores.float(), sample_loss.float(), lr=result.lr,
                                        loss=float(loss), target_losses=target_loss.numpy(),
                                        wall_time=result.metadata["seconds"])


def _times_multiplier(frozen, attributed, h, shards) -> dict:
    """W = M * h on this rank's elements: id(param) -> [K, owned numel], or None where the parameter did not
    move or no target depends on it (one foreach kernel for all parameters)."""
    moved = [(p, hp) for p, hp in zip(attributed, h) if id(p) in shards and hp is not None]
    owned = {id(p): None for p in attributed}
    if moved:
        W = torch._foreach_mul([frozen[id(p)].multiplier.unsqueeze(0) for p, _ in moved], [hp for _, hp in moved])
        owned.update({id(p): w for (p, _), w in zip(moved, W)})
    return owned


def _check_model_parallel_config(config: Config) -> None:
    """Tensor and sequence parallelism support the cached schedule with exact products (checked before any step)."""
    unsupported = {"schedule": config.schedule != "cached", "product_rank": config.product_rank is not None,
                   "curvature": config.order == 2 and config.curvature == "hvp"}
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise UnsupportedEngine(f"under tensor or sequence parallelism Config.{', Config.'.join(bad)} is not supported "
                                "yet: use schedule='cached', product_rank=None and curvature='midpoint'")


def _name_the_culprit(err: BaseException) -> None:
    """torch's own message for a loss without a graph does not say which callable is at fault."""
    if isinstance(err, RuntimeError) and not isinstance(err, ShardshapError) and \
            "does not require grad and does not have a grad_fn" in str(err):
        raise AttributionError("a loss has no graph (computed under torch.no_grad() or detached): train_loss and "
                               "target_loss must be computed from the model's forward with gradients "
                               "enabled") from err
