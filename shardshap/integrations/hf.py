"""Hugging Face `Trainer` integration: `trainer.add_callback(ShardshapCallback(targets, ...))`.

The callback drives Attributor's low-level API from Trainer's own events: a forward pre-hook on the model
takes each training batch's sample ids (the `sample_id` column, popped before the model sees it) and
records the micro-batch; `on_pre_optimizer_step` attributes the step before Trainer's optimizer.step().
Gradient clipping moves from Trainer to shardshap (same arithmetic, so training is unchanged) because
Trainer clips before any callback sees the gradients and the values need the clip factor.

Under DeepSpeed (`TrainingArguments(deepspeed=...)`) the engine clips and steps inside the boundary
micro-batch's backward call, before any callback event: the callback attributes from the engine's step
instead (wrapped for the run), and DeepSpeed keeps its clipping.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from ..attributor import Attributor
from ..config import Config
from ..errors import AttributionError


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """[b] per-sample loss for the two common heads: causal LM (shifted labels, -100 ignored, token mean per
    sample) and sequence classification ([b, C] logits). None for anything else."""
    with torch.no_grad():
        if logits.dim() == 3 and labels.shape == logits.shape[:2]:
            tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                  ignore_index=-100, reduction="none").view(labels.shape[0], -1)
            real = (labels[:, 1:] != -100).float()
            return (tok * real).sum(1) / real.sum(1).clamp(min=1)
        if logits.dim() == 2 and labels.dim() == 1 and labels.shape[0] == logits.shape[0]:
            return F.cross_entropy(logits.float(), labels, reduction="none")
    return None


def _training_engine(model: nn.Module) -> nn.Module:
    """What trains `model`: Trainer hands callbacks its unwrapped model, but under DDP or DeepSpeed the wrapper
    in `Trainer.model_wrapped` runs the training; found on the stack of the Trainer call in progress."""
    frame = inspect.currentframe()
    while frame is not None:
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, Trainer):
            wrapped = trainer.model_wrapped
            return wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) or _is_deepspeed(wrapped) \
                else model
        frame = frame.f_back
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise AttributionError("ShardshapCallback under several ranks must be called from Trainer.train() (it reads "
                               "the Trainer's wrapped model)")
    return model


def _is_deepspeed(engine) -> bool:
    return "deepspeed" in sys.modules and isinstance(engine, sys.modules["deepspeed"].DeepSpeedEngine)


def model_loss(model, targets: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Default target loss: the model's own loss on each named target batch (which must hold `labels`)."""
    return torch.stack([model(**batch).loss for batch in targets.values()])


class ShardshapCallback(TrainerCallback):
    """Values every training sample of a `transformers.Trainer` run.

    targets: name -> a batch dict for the model (e.g. input_ids, attention_mask, labels), one target each.
    config: shardshap.Config (target names default to the keys of `targets`; `max_grad_norm` comes from
        TrainingArguments). store / run_id / overwrite: as for Attributor (`num_samples` defaults to the
        training set's length).
    The training dataset needs a `sample_id` column (the row's index) and TrainingArguments needs
    `remove_unused_columns=False` so that the column reaches the model's forward. One process, or several
    under torchrun with Trainer's DDP, FSDP2 or DeepSpeed ZeRO-1/2/3 (docs/training.md).
    """

    def __init__(self, targets: Mapping[str, Mapping[str, torch.Tensor]], config: Optional[Config] = None, *,
                 store: Optional[str] = None, run_id: Optional[str] = None, overwrite: bool = False,
                 target_loss: Callable = model_loss, id_key: str = "sample_id"):
        self.targets, self.config = dict(targets), config or Config()
        self.target_loss, self.id_key = target_loss, id_key
        self.store, self.run_id, self.overwrite = store, run_id, overwrite
        self.attributor: Optional[Attributor] = None
        self.last = None  # the StepResult of the latest step
        self._hooks = []
        self._open: Optional[ExitStack] = None  # the attributor.record() of the forward in progress
        self._rec = None  # its Recording
        self._in_target_pass = False
        self._engine = None  # the DeepSpeed engine whose step attributes (None: on_pre_optimizer_step does)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        engine = _training_engine(model)
        deepspeed = _is_deepspeed(engine)
        cfg = self.config
        if args.max_grad_norm and cfg.max_grad_norm not in (None, args.max_grad_norm):
            raise AttributionError(f"TrainingArguments.max_grad_norm={args.max_grad_norm} but Config.max_grad_norm="
                                   f"{cfg.max_grad_norm}: set only one of them")
        updates = {"max_grad_norm": None if deepspeed else args.max_grad_norm or cfg.max_grad_norm,
                   "target_names": cfg.target_names or list(self.targets)}
        if self.store is not None and cfg.num_samples is None:
            updates["num_samples"] = len(train_dataloader.dataset)
        cfg = dataclasses.replace(cfg, **updates)
        self._trainer_max_grad_norm = args.max_grad_norm
        if not deepspeed:
            args.max_grad_norm = 0.0  # shardshap clips now (DeepSpeed clips in its engine, from its own config)
        device = next(model.parameters()).device
        self.targets = {k: {n: v.to(device) if torch.is_tensor(v) else v for n, v in b.items()}
                        for k, b in self.targets.items()}
        self.attributor = Attributor(engine, None if deepspeed else getattr(optimizer, "optimizer", optimizer), None,
                                     self._target_pass, cfg, store=self.store, run_id=self.run_id,
                                     overwrite=self.overwrite)
        self._engine = engine if deepspeed else None
        if deepspeed:
            self._attribute_before_the_engine_steps(engine)
        self._hooks = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       model.register_forward_hook(self._after_forward, with_kwargs=True)]

    def _target_pass(self, model, targets):
        self._in_target_pass = True  # its forward is not a training micro-batch
        try:
            return self.target_loss(model, targets)
        finally:
            self._in_target_pass = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._engine is None:  # (DeepSpeed has stepped already: see _attribute_before_the_engine_steps)
            self.last = self.attributor.attribute(self.targets)

    def _attribute_before_the_engine_steps(self, engine):
        step = engine.step

        def attributed_step(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                self.last = self.attributor.attribute(self.targets)
            return step(*args, **kwargs)
        engine.step = attributed_step  # (an instance attribute over the method; removed at on_train_end)

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self._trainer_max_grad_norm
        if self._engine is not None:
            del self._engine.step
            self._engine = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.attributor is not None:
            self.attributor.close()

    # ------------------------------------------------------------------ model hooks
    def _before_forward(self, module, args, kwargs):
        ids = kwargs.pop(self.id_key, None)
        if self._in_target_pass or not (module.training and torch.is_grad_enabled()):
            return args, kwargs  # shardshap's own target pass, evaluation or prediction
        if ids is None:
            raise AttributionError(
                f"a training batch has no {self.id_key!r}: add the column (each row's index in the training set) "
                "and set TrainingArguments(remove_unused_columns=False) so that it reaches the model")
        if self._open is not None:  # the previous training forward raised: drop what it recorded
            self._open.__exit__(AttributionError, AttributionError("the previous training forward failed"), None)
        self._open = ExitStack()
        self._rec = self._open.enter_context(self.attributor.record(torch.as_tensor(ids).reshape(-1),
                                                                     targets=self.targets))
        return args, kwargs

    def _after_forward(self, module, args, kwargs, output):
        if self._open is None or self._in_target_pass:  # (streaming: the target pass runs inside record())
            return None
        logits, labels = getattr(output, "logits", None), kwargs.get("labels")
        if logits is not None and labels is not None:
            self._rec.sample_loss = per_sample_loss(logits, labels)
        self._open.close()  # the hooks on the outputs still catch the backward that follows
        self._open, self._rec = None, None
        return None
