"""The batch gradient the streaming schedule freezes its step at.

Under `schedule="streaming"` W is fixed before the training backward, so the secant slope and the midpoint
of the step are taken at a prediction of the (clipped) batch gradient; only the clip factor is the real
one. docs/method.md ("Streaming") has the fidelity of each predictor against the exact schedule.
"""
from __future__ import annotations

from typing import Optional

import torch

GRADIENT_PREDICTORS = ("momentum", "previous", "zero")


def predicted_grad(name: str, update_rule, shard, previous: Optional[torch.Tensor], dtype) -> torch.Tensor:
    """The prediction for one parameter's owned elements: 'previous' (the last step's clipped gradient),
    'momentum' (the optimizer's first moment, bias-corrected) or 'zero'; where a predictor has nothing yet
    (first step, no momentum state) it falls back to zero."""
    if name == "previous" and previous is not None:
        return previous
    if name == "momentum":
        expected = update_rule.expected_grad(shard.value, shard.group, shard.state, dtype)
        if expected is not None:
            return expected
    return torch.zeros_like(shard.value, dtype=dtype)
