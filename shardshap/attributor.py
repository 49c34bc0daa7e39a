"""`Attributor`: runs one optimizer step and returns every sample's In-Run Data Shapley value."""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .backends import Engine
from .config import Config
from .estimators import Frozen, freeze, owen_multiplier
from .ghost import Capture, plan
from .optim.adam import AdamRule
from .optim.base import UnsupportedOptimizer, scalar

SIGN_CONVENTION = ("positive value = the sample reduced that target's loss in the steps it took part in "
                   "(U(S) = L_target(theta_t) - L_target(theta_after_step(S)))")


class AttributionError(RuntimeError):
    """Bad input or an inconsistency detected during a step; the optimizer has not stepped."""


@dataclass
class StepResult:
    """The values of one optimizer step (rows follow the order of the batch and its micro-batches)."""
    scores: torch.Tensor          # [b, K]: this step's value of each sample for each target (target-loss units)
    sample_ids: torch.Tensor      # [b]
    loss: torch.Tensor            # the training loss of the step (mean or sum over the batch, per Config.reduction)
    sample_loss: torch.Tensor     # [b]: each sample's training loss at this step
    step: int                     # index of this optimizer step (0-based, counted by the Attributor)
    lr: float                     # learning rate of the first parameter group, as used by this step
    target_loss: torch.Tensor     # [K]: target losses where the target gradient was taken
    clip_factor: float            # gradient clip factor of the step (1.0 when not clipped)
    metadata: dict = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        """[K]: sum of the step's values, the estimate of U(B) - U(empty)."""
        return self.scores.sum(0)


@dataclass
class Recording:
    """One micro-batch recorded by `Attributor.record` (low-level API). Set `sample_loss` ([b] per-sample
    training losses) to have the store keep them; left unset they are stored as NaN."""
    sample_ids: torch.Tensor
    sample_loss: Optional[torch.Tensor] = None


def _as_ids(x, j: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise AttributionError(f"sample_ids of micro-batch {j} must be a 1-D integer tensor or list, got "
                               f"dtype {t.dtype} and shape {tuple(t.shape)}")
    return t.to(torch.int64).cpu()


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
    else:
        micro_ids, micro = [sample_ids], [batch]
    return micro, [_as_ids(x, j) for j, x in enumerate(micro_ids)]


class _FullW(Mapping):
    """id(param) -> full W [K, *shape], gathered from the ranks' owned elements each time it is read.

    Capture.products reads one module's entries at a time, so under FSDP2/ZeRO-3 only that module's W is
    ever whole on a rank (bounded memory); every rank reads in the same module order (collectives)."""

    def __init__(self, engine, shards, owned, params, K, dtype):
        self.engine, self.shards, self.owned, self.params, self.K, self.dtype = engine, shards, owned, params, K, dtype

    def __getitem__(self, pid):
        if self.owned[pid] is None:
            p = self.params[pid]
            return torch.zeros(self.K, *p.shape, dtype=self.dtype, device=p.device)
        return self.engine.gather(self.shards[pid], self.owned[pid])

    def __iter__(self):
        return iter(self.owned)

    def __len__(self):
        return len(self.owned)


def _warn_if_bf16_is_emulated(device: torch.device) -> None:
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
                      "multiplications are emulated "
                      "there (measured 1.3x to 120x slower than float32 on CPUs without AMX), so attribution gets "
                      "slower, not faster; use preset='lowrank' (product_rank=16) or 'exact'", stacklevel=3)


class Attributor:
    """Values every training sample during training (DESIGN 2): `step()` replaces
    `zero_grad(); loss.backward(); optimizer.step()` and returns the step's per-sample values.

    train_loss(model, batch) -> Tensor[b] per-sample losses; target_loss(model, targets) -> Tensor[K]
    (or a 0-d tensor for one target). Training is not changed: parameters and optimizer state after
    `step()` equal those of the plain step on the same batch.

    Loops that own their backward and optimizer step use the low-level API instead (train_loss may then
    be None): `with attr.record(ids): loss = ...; loss.backward()` for each micro-batch, then
    `attr.attribute(targets)` before `optimizer.step()` (docs/training.md).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loss: Callable[[nn.Module, Any], torch.Tensor],
                 target_loss: Callable[[nn.Module, Any], torch.Tensor],
                 config: Optional[Config] = None, *, store: Optional[str] = None,
                 run_id: Optional[str] = None, overwrite: bool = False):
        self.config = config if config is not None else Config()
        if not isinstance(self.config, Config):
            raise TypeError(f"config must be a shardshap.Config, got {type(self.config).__name__}")
        self.engine = Engine.detect(model)
        optimizer = self.engine.resolve_optimizer(optimizer)
        self.model, self.module, self.optimizer = model, self.engine.module, optimizer
        self.train_loss, self.target_loss = train_loss, target_loss
        self.rule = self.engine.update_rule(optimizer)
        if self.config.estimator == "adam-lagged" and not isinstance(self.rule, AdamRule):
            raise UnsupportedOptimizer(
                f"estimator='adam-lagged' needs torch.optim.Adam or AdamW, not {type(optimizer).__name__}; "
                "use estimator='secant' (any supported optimizer) or 'sgd'")
        self.plan = plan(self.module, self.config.exclude, trainable=self.engine.trainable(optimizer))
        if not self.plan.params:
            raise AttributionError("no trainable parameter to attribute: every parameter is frozen, outside "
                                   "the optimizer, or excluded")
        any_f64 = any(p.dtype == torch.float64 for p in self.module.parameters())
        self.dtype = {"float32": torch.float32, "float64": torch.float64}.get(
            self.config.compute_dtype, torch.float64 if any_f64 else torch.float32)
        cache_dtype = {None: None, "bfloat16": torch.bfloat16}[self.config.cache_dtype]
        self.capture = Capture(self.plan, cache_dtype=cache_dtype, compute_dtype=self.dtype)
        self._device = next(iter(self.plan.params.values())).device
        if self.config.cache_dtype is not None or self.config.target_dtype is not None:
            _warn_if_bf16_is_emulated(self._device)
        self.step_index = 0
        if store is not None and self.config.num_samples is None:
            raise AttributionError("writing a store needs the size of the training set: set "
                                   "Config(num_samples=N) (sample ids are in [0, N))")
        self.store_path, self.overwrite = store, overwrite
        self.run_id = run_id or "run-" + hashlib.sha256(
            json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        self._writer = None  # opened at the first step, when the local batch size is known
        self._resume_step: Optional[int] = None
        self._recorded: list[Recording] = []  # this step's micro-batches so far

    # ------------------------------------------------------------------ public API
    def step(self, batch, sample_ids, targets) -> StepResult:
        """One optimizer step over `batch` (or a list of micro-batches: one step, one game)."""
        if self.train_loss is None:
            raise AttributionError("step() needs train_loss(model, batch) -> per-sample losses; without it use "
                                   "the low-level API: attr.record(ids) around your forward/backward, then "
                                   "attr.attribute(targets) before optimizer.step()")
        t0 = time.perf_counter()
        micro, ids = _micro_batches(batch, sample_ids)
        n = sum(len(i) for i in ids)
        c = 1.0 / n if self.config.reduction == "mean" else 1.0  # this rank's loss; DDP averages over ranks
        opt, engine = self.optimizer, self.engine
        engine.zero_grad(opt)
        try:
            for j, (mb, mids) in enumerate(zip(micro, ids)):
                last = j == len(micro) - 1
                with self._record(mids) as rec, engine.no_sync(last):
                    per_sample = self.train_loss(self.model, mb)
                    self._check_loss(per_sample, len(mids), j)
                    if len(micro) == 1 and self.config.reduction == "mean":
                        engine.backward(per_sample.mean())  # bit-identical to the plain step
                    else:
                        engine.backward(per_sample.sum() * c)
                    rec.sample_loss = per_sample.detach()
                engine.after_micro_batch(last)
            result = self._attribute_recorded(targets, grad_norm=None)
            engine.optimizer_step(opt)
        except BaseException:
            engine.zero_grad(opt)  # nothing half-applied: no step, no leftover gradient, no recording
            self._discard()
            raise
        result.metadata["seconds"] = time.perf_counter() - t0
        self._finish(result)
        return result

    # ------------------------------------------------------------------ low-level API (user-owned loops)
    @contextmanager
    def record(self, sample_ids):
        """Capture one micro-batch of your own training forward (and the backward that follows it, inside
        or after the block): `with attr.record(ids) as rec: loss = ...; loss.backward()`. Set
        `rec.sample_loss` (Tensor[b]) to store per-sample losses. Call once per micro-batch, in order."""
        if self.engine.owns_backward:
            raise AttributionError("the low-level API cannot drive DeepSpeed engines (DeepSpeed owns backward, "
                                   "clipping and step); use attr.step(batch, ids, targets)")
        with self._record(sample_ids) as rec:
            yield rec

    @contextmanager
    def _record(self, sample_ids):
        try:  # any failure drops the whole step's recordings: the next step starts clean
            rec = Recording(_as_ids(sample_ids, len(self._recorded)))
            if len(rec.sample_ids) == 0:
                raise AttributionError("the step has no samples (empty sample_ids)")
            if self.store_path is not None:
                self._check_ids(torch.cat([r.sample_ids for r in self._recorded] + [rec.sample_ids]))
            self._recorded.append(rec)
            with self.capture.recording(len(rec.sample_ids), len(self._recorded) - 1):
                yield rec
        except BaseException:
            self._discard()
            raise

    def attribute(self, targets, grad_norm: Optional[float] = None) -> StepResult:
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
        try:
            result = self._attribute_recorded(targets, grad_norm)
        except BaseException:
            self.engine.zero_grad(self.optimizer)
            raise
        result.metadata["seconds"] = time.perf_counter() - t0
        self._finish(result)
        return result

    def _attribute_recorded(self, targets, grad_norm) -> StepResult:
        try:
            sizes = [len(r.sample_ids) for r in self._recorded]
            losses = [r.sample_loss for r in self._recorded]
            device = next((x.device for x in losses if x is not None), torch.device("cpu"))
            sample_loss = torch.cat([x.detach().reshape(-1) if x is not None else
                                     torch.full((len(r.sample_ids),), math.nan, device=device)
                                     for x, r in zip(losses, self._recorded)])
            result = self._attribute(targets, sizes, sample_loss, grad_norm)
            result.sample_ids = torch.cat([r.sample_ids for r in self._recorded])
            return result
        finally:
            self._discard()

    def _discard(self) -> None:
        self._recorded = []
        self.capture.clear()

    def _finish(self, result: StepResult) -> None:
        if self.store_path is not None:
            self._write(result)
        self.step_index += 1

    def state_dict(self) -> dict:
        """The attribution part of a training checkpoint (flushes the store first)."""
        state = {"step": self.step_index, "run_id": self.run_id, "config": self.config.to_dict()}
        if self._writer is not None:
            state["store"] = self._writer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at the checkpoint's step: the store rewrites every step from there on."""
        if state.get("run_id", self.run_id) != self.run_id:
            raise AttributionError(f"checkpoint of run {state['run_id']!r}, but this Attributor is run "
                                   f"{self.run_id!r}: pass run_id= or the same config")
        self.step_index = int(state["step"])
        self._resume_step = self.step_index
        if self._writer is not None:
            self._writer.load_state_dict({**state["store"], "next_step": self.step_index})

    def close(self) -> None:
        """Flush and finalise the store (per-sample totals), and remove the hooks from the model."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._writer = None
            self.capture.remove()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._writer is not None:
            self._writer.__exit__(exc_type, exc, tb)  # flush what is there; no collective while unwinding
            self._writer = None
        self.close()

    @property
    def excluded(self) -> list[str]:
        return list(self.plan.excluded)

    # ------------------------------------------------------------------ internals
    def _check_ids(self, ids: torch.Tensor) -> None:
        """The store's id rules, checked before training so that a bad step changes nothing."""
        N = self.config.num_samples
        bad = ids[(ids < 0) | (ids >= N)]
        if len(bad):
            raise AttributionError(f"sample ids {bad[:5].tolist()} are outside [0, num_samples={N}): ids must "
                                   "index the training set (set Config(num_samples=...) to its size)")
        if len(torch.unique(ids)) != len(ids):
            raise AttributionError("sample_ids has duplicates within one optimizer step; each sample of a step "
                                   "needs its own id (the store keeps one slot per sample and step)")

    def _write(self, result: StepResult) -> None:
        if self._writer is None:
            from .store import ScoreWriter
            engine = self.engine
            local = torch.tensor([len(result.sample_ids), len(result.sample_ids)], dtype=torch.int64)
            if engine.distributed:  # the widest rank sets the slots; the sum is the global batch
                widest = local[:1].clone()
                dist.all_reduce(widest, op=dist.ReduceOp.MAX)
                local = torch.cat([widest, engine.all_reduce_sum(local[1:])])
            names = self.config.target_names or [f"target{k}" for k in range(result.scores.shape[1])]
            self._writer = ScoreWriter(
                self.store_path, run_id=self.run_id, config=self.config.to_dict(), targets=names,
                num_samples=self.config.num_samples, slots_per_rank=int(local[0]),
                world_size=engine.world_size, rank=engine.rank,
                barrier=dist.barrier if engine.distributed else None, overwrite=self.overwrite,
                resume_step=self._resume_step,
                metadata={"estimator": self.config.estimator, "order": self.config.order,
                          "mode": self.config.mode, "sign_convention": SIGN_CONVENTION,
                          "excluded": self.excluded, "global_batch": int(local[1]),
                          "versions": {"shardshap": __import__("shardshap").__version__,
                                       "torch": torch.__version__}})
        self._writer.write_step(
            self.step_index, result.sample_ids, result.scores.float().cpu(), result.sample_loss.float().cpu(),
            lr=result.lr, loss=float(result.loss), target_losses=result.target_loss.cpu().numpy(),
            wall_time=result.metadata["seconds"])

    def _check_loss(self, per_sample, b: int, j: int) -> None:
        if not torch.is_tensor(per_sample):
            raise AttributionError(f"train_loss must return a Tensor of per-sample losses, got "
                                   f"{type(per_sample).__name__}")
        if per_sample.shape != (b,):
            raise AttributionError(
                f"train_loss returned shape {tuple(per_sample.shape)} for micro-batch {j}, but its sample_ids "
                f"has {b} ids: it must return one loss per sample, shape [{b}] (e.g. a loss with "
                "reduction='none', averaged over each sample's tokens), and sample_ids must match the batch")
        if not torch.isfinite(per_sample.detach()).all():
            bad = (~torch.isfinite(per_sample.detach())).nonzero().flatten().tolist()
            raise AttributionError(f"train_loss is not finite for samples at positions {bad[:10]} of micro-batch "
                                   f"{j}; the optimizer step was not taken")

    def _attribute(self, targets, sizes, sample_loss, grad_norm=None) -> StepResult:
        cfg, opt, dtype, engine = self.config, self.optimizer, self.dtype, self.engine
        bytes_before = engine.bytes_sent
        shards = engine.shards(opt)  # this rank's elements of every parameter the optimizer moves
        if grad_norm is None or cfg.max_grad_norm is None:
            clip = engine.clip(shards, cfg.max_grad_norm)
        else:  # the caller clipped already (low-level API): clip_grad_norm_'s factor for that norm
            clip = min(1.0, cfg.max_grad_norm / (float(grad_norm) + 1e-6))
        frozen: dict[int, Frozen] = {
            pid: freeze(cfg.estimator, cfg.order, self.rule, sh.value, sh.grad, sh.group, sh.state, clip, dtype,
                        cfg.compile_math)
            for pid, sh in shards.items()}
        attributed = list(self.plan.params.values())
        h, target_loss = self._target_gradients(targets, attributed, shards, frozen)

        K = target_loss.numel()
        offset = self._cold_start(shards, frozen, attributed, h, sizes, clip)
        owned = {}  # W on this rank's elements: [K, owned numel] (None: not moved, or no target uses it)
        for p, hp in zip(attributed, h):
            moved = id(p) in shards and hp is not None
            owned[id(p)] = frozen[id(p)].multiplier.unsqueeze(0) * hp if moved else None
        W = _FullW(engine, shards, owned, {id(p): p for p in attributed}, K, dtype)
        if cfg.product_rank is not None or not engine.partitioned:
            W = {pid: W[pid] for pid in owned}  # low rank factorises every layer up front: materialise
        per_param = self.capture.products(W, sizes, dtype, rank=cfg.product_rank)  # low rank: W becomes W_r
        if self.engine.distributed:  # DDP averages gradients: each sample's share of the global gradient
            per_param = {name: v / self.engine.world_size for name, v in per_param.items()}
        if cfg.check_completeness:
            self._check_completeness(per_param, W if isinstance(W, dict) else None, owned, shards, clip)
        scores = torch.stack(list(per_param.values())).sum(0) if per_param else torch.zeros(sum(sizes), K)
        if offset is not None:
            scores = scores + offset
        group0 = opt.param_groups[0]
        return StepResult(
            scores=scores, sample_ids=torch.empty(0, dtype=torch.int64),
            loss=sample_loss.mean() if cfg.reduction == "mean" else sample_loss.sum(),  # NaN if unrecorded
            sample_loss=sample_loss, step=self.step_index, lr=scalar(group0["lr"]),
            target_loss=target_loss, clip_factor=clip,
            metadata={"estimator": cfg.estimator, "order": cfg.order, "excluded": self.excluded,
                      "bytes_sent": engine.bytes_sent - bytes_before,
                      "cold_start": offset is not None, "product_rank": cfg.product_rank,
                      **{f"product_{k}": v for k, v in self.capture.lowrank_info.items()}})

    def _target_gradients(self, targets, attributed, shards, frozen):
        """([K, owned numel] per attributed parameter, or None where no target depends on it), losses [K]."""
        cfg = self.config
        use_hvp = cfg.order == 2 and cfg.curvature == "hvp"
        saved = None
        if cfg.order == 2 and not use_hvp:  # evaluate at theta_mid; restore bit-exactly afterwards
            saved = {pid: sh.value.clone() for pid, sh in shards.items()}
            with torch.no_grad():
                for pid, sh in shards.items():
                    sh.value.add_(frozen[pid].shift.to(sh.value.dtype))
        devices = sorted({p.device.index for p in attributed if p.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):  # the target pass must not shift training's RNG
                if use_hvp:
                    h, value = self._hvp_gradients(attributed, shards, frozen, targets)
                else:
                    h, value = self.engine.target_gradients(lambda: self._evaluate_targets(targets), attributed,
                                                            self.dtype, split=cfg.target_sharding == "split")
        finally:
            if saved is not None:
                with torch.no_grad():
                    for pid, sh in shards.items():
                        sh.value.copy_(saved[pid])
        return h, value.to(self.dtype)

    def _evaluate_targets(self, targets) -> torch.Tensor:
        # Config.target_dtype: the target forward (and so its backward) under bf16 autocast
        with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self.config.target_dtype is not None):
            value = self.target_loss(self.module, targets)
        if not torch.is_tensor(value) or value.dim() > 1 or value.numel() == 0:
            raise AttributionError(
                "target_loss must return a 0-d tensor (one target) or a 1-d tensor [K] (one loss per "
                f"target), got {type(value).__name__}"
                f"{' of shape %s' % (tuple(value.shape),) if torch.is_tensor(value) else ''}")
        value = value.reshape(-1)
        if not torch.isfinite(value.detach()).all():
            raise AttributionError(f"target_loss is not finite ({value.detach().tolist()}); the "
                                   "optimizer step was not taken")
        if self.config.target_names is not None and len(self.config.target_names) != value.numel():
            raise AttributionError(f"target_loss returned {value.numel()} targets but "
                                   f"Config.target_names names {len(self.config.target_names)}")
        return value

    def _hvp_gradients(self, attributed, shards, frozen, targets):
        """h + H (theta_mid - theta_t) per target: the exact second-order Taylor form of the midpoint
        gradient, by double backward (unsharded parameters only)."""
        if self.engine.partitioned:
            raise AttributionError("curvature='hvp' needs unsharded parameters; use curvature='midpoint' "
                                   "with FSDP2 or DeepSpeed")
        value = self._evaluate_targets(targets)
        moved = [sh.param for sh in shards.values()]
        grads = [[] for _ in attributed]
        for k in range(value.numel()):
            gk = torch.autograd.grad(value[k], attributed, retain_graph=True, allow_unused=True, create_graph=True)
            full = torch.autograd.grad(value[k], moved, retain_graph=True, allow_unused=True, create_graph=True)
            dot = sum((g * frozen[id(p)].shift.view_as(g).to(g.dtype)).sum()
                      for g, p in zip(full, moved) if g is not None)
            hv = (torch.autograd.grad(dot, attributed, retain_graph=True, allow_unused=True)
                  if torch.is_tensor(dot) and dot.requires_grad else [None] * len(attributed))
            for acc, g, v, p in zip(grads, gk, hv, attributed):
                total = g if v is None else (v if g is None else g + v)
                acc.append(torch.zeros_like(p, dtype=self.dtype).reshape(-1) if total is None
                           else total.detach().to(self.dtype).reshape(-1))
        return [torch.stack(g) for g in grads], value.detach()

    def _cold_start(self, shards, frozen, attributed, h, sizes, clip):
        """Replace the secant multiplier of cold Adam parameters by Owen's; returns the per-sample offset [K]
        that keeps the values' sum equal to the secant's (efficiency), or None when the step is warm."""
        cfg, engine = self.config, self.engine
        if cfg.estimator != "secant" or cfg.cold_start != "owen":
            return None
        cold = [(p, hp) for p, hp in zip(attributed, h) if id(p) in shards and hp is not None
                and (t := self.rule.step_number(shards[id(p)].state)) is not None and t <= cfg.cold_steps]
        if not cold:
            return None
        n = self._global_count(sum(sizes))
        sum_sq = self.capture.sum_of_squares({id(p) for p, _ in cold}, sizes, self.dtype)
        offset = 0.0
        for p, hp in cold:  # every rank runs this loop in the same parameter order (collectives inside)
            sh = shards[id(p)]
            full = sum_sq.get(id(p), torch.zeros(p.shape, dtype=self.dtype, device=hp.device))
            if engine.distributed:  # each rank's samples are its own players: add their squares up
                full = engine.all_reduce_sum(full / engine.world_size ** 2)
            grad = sh.grad.to(self.dtype) / clip  # sum of the per-sample contributions, before clipping
            owen = owen_multiplier(self.rule.displacement_fn(sh.value, sh.group, sh.state, self.dtype),
                                   grad, engine.owned(sh, full), n, clip)
            offset = offset + ((frozen[id(p)].multiplier - owen) * grad).unsqueeze(0).mul(hp).sum(1)
            frozen[id(p)].multiplier = owen
        return engine.reduce_partial(offset) / n

    def _global_count(self, local: int) -> int:
        if not self.engine.distributed:
            return local
        return int(self.engine.all_reduce_sum(torch.tensor([local], dtype=torch.int64)).item())

    def _check_completeness(self, per_param, W, owned, shards, clip):
        """`W`: the full vectors the products used (low rank may have replaced them), or None when they
        were gathered on demand, in which case the owned elements `owned` are exactly them."""
        names = [n for n, p in self.plan.params.items() if id(p) in shards]
        # [params, 2, K]: per-sample sums and sums of magnitudes, added over ranks in one collective
        sums = self.engine.all_reduce_sum(torch.stack(
            [torch.stack([per_param[n].sum(0), per_param[n].abs().sum(0)]) for n in names]))
        def expected(p):  # [2, K]: <batch gradient, W> on owned elements, and its rounding scale
            w = owned[id(p)] if W is None else self.engine.owned(shards[id(p)], W[id(p)], lead=1)  # a view
            g = shards[id(p)].grad.to(self.dtype)
            # a bf16/fp16 batch gradient is rounded per coordinate: where <g, W> cancels across coordinates
            # its error scales with sum_j |g_j W_j|, not with the per-sample magnitudes
            low = p.dtype not in (torch.float32, torch.float64)
            rounding = torch.linalg.vecdot(w.abs(), g.abs()) if low else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                      device=w.device)
            return torch.stack([torch.linalg.vecdot(w, g), rounding]) / clip
        exp_and_rounding = self.engine.reduce_partial(torch.stack([expected(self.plan.params[n]) for n in names]))
        (ghost, magnitude), (exp, rounding) = sums.unbind(1), exp_and_rounding.unbind(1)  # each [params, K]
        # the batch gradient is accumulated in the parameter's dtype: bf16/fp16 round far more
        floor = 2e-2 if self.capture.cache_dtype is not None else 0.0  # products rounded to bf16
        tol = [max(floor, {torch.float64: 1e-8, torch.float32: 1e-3}.get(self.plan.params[n].dtype, 5e-2))
               for n in names]
        rel = ((ghost - exp).abs() / (magnitude + exp.abs() + rounding + 1e-30)).amax(1).tolist()  # one host sync
        bad = [f"{name} (relative mismatch {r:.2e})" for name, r, t in zip(names, rel, tol) if r > t]
        if bad:
            raise AttributionError(
                "per-sample products do not add up to the batch gradient for: " + ", ".join(bad) + ". The "
                "parameter is probably used outside the module that owns it (a functional call such as "
                "F.linear(x, module.weight)) or broadcast across the batch. Exclude it with Config(exclude=[...]) "
                "or route its use through its module; the optimizer step was not taken.")
