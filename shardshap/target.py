"""The target pass: gradients h_k of every target loss, where the estimator says to take them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from .errors import AttributionError
from .foreach import batched

MAX_UNNAMED_TARGETS = 64  # more losses than this without Config.target_names is taken for a missing reduction


@contextmanager
def target_mode(module: torch.nn.Module, mode: str):
    """The module in eval mode for the target loss (mode 'eval'), or as it is ('train'); every submodule's
    own mode is restored afterwards (a model may keep parts in eval mode on purpose).

    transformers checkpoints a layer only while that layer is in training mode, so in eval mode the target
    pass would keep every activation that activation checkpointing saves in training: a checkpointed layer
    whose own forward draws no dropout keeps its own training flag (its submodules, dropout included, are
    in eval mode, so the target loss stays deterministic)."""
    saved = [(m, m.training) for m in module.modules()] if mode == "eval" else []
    if mode == "eval":
        module.eval()
        for m, training in saved:
            if training and _checkpointed_without_own_dropout(m):
                m.training = True
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def _checkpointed_without_own_dropout(m: torch.nn.Module) -> bool:
    """A transformers layer with gradient checkpointing on, whose forward reads no dropout rate of its own
    (layers such as BART's call F.dropout(p=self.dropout, training=self.training) themselves)."""
    if getattr(m, "gradient_checkpointing", False) is not True:
        return False
    return not any("dropout" in name and isinstance(value, float) and value > 0 for name, value in vars(m).items())


def target_autocast(config, device: torch.device, outer: Optional[torch.dtype] = None,
                    small: bool = True) -> Optional[torch.dtype]:
    """The dtype the target pass autocasts to, or None (Config.target_dtype). 'auto': bf16 where attribution
    runs kernel by kernel (a CPU). Where it batches its kernels against launch costs (foreach.batched): `outer`,
    the autocast the user's step runs under; without one, none while the step's tensors are `small` (autocast's
    casts would cost launches) and bf16 when they are not (the casts cost copies, which bf16 GEMMs repay)."""
    if config.target_dtype == "bfloat16" or (config.target_dtype == "auto" and not batched(device)):
        return torch.bfloat16
    if config.target_dtype != "auto":
        return None
    return outer if outer is not None else (None if small else torch.bfloat16)


def evaluate_targets(target_loss, module, targets, config, reads, device: torch.device,
                     autocast: Optional[torch.dtype] = None) -> torch.Tensor:
    """target_loss(module, targets) as a [K] tensor, validated (finiteness at `reads.read()`, a
    checks.HostRead); under `autocast` (target_autocast) if given.
    (The caller holds `target_mode` around this and the backward: a checkpoint recomputes in the same modes.)"""
    # casts cached by an enclosing autocast (the user's) hold the parameters before the midpoint shift
    torch.clear_autocast_cache()
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        value = target_loss(module, targets)
    if not torch.is_tensor(value) or value.dim() > 1 or value.numel() == 0:
        raise AttributionError(
            "target_loss must return a 0-d tensor (one target) or a 1-d tensor [K] (one loss per "
            f"target), got {type(value).__name__}"
            f"{' of shape %s' % (tuple(value.shape),) if torch.is_tensor(value) else ''}")
    if not value.requires_grad:
        raise AttributionError("target_loss returned a tensor without a graph (computed under torch.no_grad() "
                               "or detached): shardshap differentiates it; compute it from the model's "
                               "forward with gradients enabled")
    value = value.reshape(-1)
    if config.target_names is None and value.numel() > MAX_UNNAMED_TARGETS:
        raise AttributionError(
            f"target_loss returned {value.numel()} losses, so every step would have {value.numel()} targets: a "
            "reduction is probably missing (per-token or per-sample losses instead of one mean per target set). "
            "Return one loss per target, e.g. `loss.mean()` per set stacked into [K]; if you really mean "
            f"{value.numel()} targets, name them with Config(target_names=[...])")
    reads.check(~torch.isfinite(value.detach()).all(),
                lambda: f"target_loss is not finite ({value.detach().tolist()})")
    if config.target_names is not None and len(config.target_names) != value.numel():
        raise AttributionError(f"target_loss returned {value.numel()} targets but "
                               f"Config.target_names names {len(config.target_names)}")
    return value


def target_gradients(backend, evaluate, attributed, shards, frozen, config, dtype):
    """([K, owned numel] per attributed parameter, or None where no target depends on it), losses [K].

    Order 2 with curvature='midpoint' takes them at theta_t + shift (restored bit-exactly afterwards);
    curvature='hvp' adds an exact Hessian-vector product to the gradient at theta_t."""
    use_hvp = config.order == 2 and config.curvature == "hvp"
    shifts = {pid: f.shift for pid, f in frozen.items()} if config.order == 2 and not use_hvp else None
    devices = sorted({p.device.index for p in attributed if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the target pass must not shift training's RNG
        if use_hvp:
            h, value = hvp_gradients(backend, evaluate, attributed, shards, frozen, dtype)
        else:
            with backend.shifted(shards, shifts):
                h, value = backend.target_gradients(evaluate, attributed, dtype,
                                                    split=config.target_sharding == "split")
    return h, value.to(dtype)


def hvp_gradients(backend, evaluate, attributed, shards, frozen, dtype):
    """h + H (theta_mid - theta_t) per target: the exact second-order Taylor form of the midpoint
    gradient, by double backward (unsharded parameters only)."""
    if not backend.supports_hvp:
        raise AttributionError("curvature='hvp' needs unsharded parameters; use curvature='midpoint' "
                               "with FSDP2 or DeepSpeed")
    value = evaluate()
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
            acc.append(torch.zeros_like(p, dtype=dtype).reshape(-1) if total is None
                       else total.detach().to(dtype).reshape(-1))
    return [torch.stack(g) for g in grads], value.detach()
