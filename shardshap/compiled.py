"""torch.compile'd models: what attribution needs from them.

- Parameter names are the model's own, without torch.compile's `_orig_mod.` prefix (`uncompiled`).
- The capture hooks run eagerly (`torch.compiler.disable` in ghost/capture.py): dynamo breaks its graph at
  each attributed module instead of retracing a hook per module (which hit its recompile limit).
- AOTAutograd's compiled backward donates its saved buffers by default, which forbids a second backward
  through the same graph (the first step's batch-first probe, one target gradient per target). Graphs
  compiled inside `compile_ready()` (every training forward and target pass of `Attributor.step`,
  `record` and `attribute`) keep them; the setting is restored afterwards.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

from torch import nn

from .errors import AttributionError


def is_compiled(model: nn.Module) -> bool:
    """Whether `model`, or a module in it, is compiled with torch.compile (or nn.Module.compile)."""
    dynamo = sys.modules.get("torch._dynamo")  # (torch.compile imports it: without it nothing is compiled)
    if dynamo is None:
        return False
    return isinstance(model, dynamo.eval_frame.OptimizedModule) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def uncompiled(module: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (same parameters, plain names), or `module` itself."""
    return getattr(module, "_orig_mod", module) if is_compiled(module) else module


@contextmanager
def compile_ready(compiled: bool):
    """Context for attribution's forward and backward passes (see the module docstring): on a compiled model,
    graphs compiled inside keep their buffers, and torch's error for one compiled outside names the fix."""
    if not compiled:
        yield
        return
    import torch._functorch.config as functorch_config
    try:
        with functorch_config.patch(donated_buffer=False):
            yield
    except RuntimeError as err:
        if "donated buffers" not in str(err):
            raise
        raise AttributionError(
            "the model's compiled backward donates its saved buffers (torch.compile's default), so attribution "
            "cannot backpropagate through a graph twice: this graph was compiled outside the Attributor (a "
            "forward before it was created, or outside attr.step / attr.record). Create the Attributor before "
            "the model's first forward, or set torch._functorch.config.donated_buffer = False before it.") from err
