"""The public result types of a step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


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


@dataclass
class Recording:
    """One micro-batch recorded by `Attributor.record` (low-level API). Set `sample_loss` ([b] per-sample
    training losses) to have the store keep them; left unset they are stored as NaN."""
    sample_ids: torch.Tensor
    sample_loss: Optional[torch.Tensor] = None
