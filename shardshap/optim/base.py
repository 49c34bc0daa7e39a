"""The coordinate-wise update map D(.) of one optimizer step, frozen at the current optimizer state.

For a parameter with batch gradient G (the gradient the optimizer receives), a coordinate-wise
optimizer moves it by D(G). Along the path alpha*G, the secant slope s = (D(G) - D(0)) / G turns the
step into D(alpha G) ~ D(0) + s * alpha * G, which is what every estimator builds on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UnsupportedOptimizer


@dataclass
class StepMap:
    """One parameter's step: `d0` = D(0), `slope` = secant slope, so that D(G) = d0 + slope * G."""
    d0: torch.Tensor
    slope: torch.Tensor
    shift: Optional[torch.Tensor] = None  # midpoint(grad) for the grad the map was built at, where a rule's
                                          # fused kernel computed it on the way (else None)

    def displacement(self, grad: torch.Tensor) -> torch.Tensor:
        """D(G): the real update of the optimizer for gradient `grad`."""
        return self.d0 + self.slope * grad

    def midpoint(self, grad: torch.Tensor) -> torch.Tensor:
        """(D(0) + D(G)) / 2: the shift from theta_t to the midpoint of the step."""
        return torch.addcmul(self.d0, self.slope, grad, value=0.5)

    def midpoint_shift(self, grad: torch.Tensor) -> torch.Tensor:
        """`midpoint(grad)` for the gradient the map was built at (any dtype): the fused kernel's when it
        computed it, else computed in the map's dtype."""
        return self.shift if self.shift is not None else self.midpoint(grad.to(self.d0.dtype))


def scalar(x) -> float:
    """Hyperparameters may be Python numbers or 0-d tensors (e.g. a tensor lr)."""
    return float(x.item()) if torch.is_tensor(x) else float(x)


class UpdateRule:
    """Reads one optimizer family's hyperparameters and state; computes D(.) without mutating anything."""

    name = "optimizer"

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise UnsupportedOptimizer for options the rule does not model."""

    def step_map(self, param, grad, group, state, dtype, compiled: bool = False) -> StepMap:
        """D(0) and the secant slope for gradient `grad`; `compiled`: use the rule's torch.compile'd
        kernel where it has one (Config.compile_math)."""
        raise NotImplementedError

    def step_maps(self, shards: list, dtype, compiled: bool = False) -> list[StepMap]:
        """`step_map` of every OwnedSlice in `shards` (at its gradient); a rule may take them all at once."""
        return [self.step_map(sh.value, sh.grad, sh.group, sh.state, dtype, compiled) for sh in shards]

    def step_number(self, state) -> int | None:
        """1-based index of the step about to be taken, for optimizers whose map depends on it."""
        return None

    def expected_grad(self, param, group, state, dtype) -> Optional[torch.Tensor]:
        """The gradient the optimizer's momentum expects next (its first moment, bias-corrected, with L2
        weight decay and `maximize` undone), or None where the rule keeps no such state."""
        return None

    def displacement_fn(self, param, group, state, dtype):
        """G -> D(G) for any gradient tensor G (the real update map, frozen state); nonlinear rules only."""
        raise NotImplementedError(f"{self.name}: the update map is affine; use step_map")

    def lagged_scale(self, param, group, state, dtype) -> torch.Tensor:
        """Paper B's per-coordinate step scale lr*(1-b1)/bc1/(sqrt(vhat_{t-1})+eps) (Adam family only)."""
        raise UnsupportedOptimizer(
            f"estimator='adam-lagged' needs an Adam-family optimizer, not {self.name}; "
            "use estimator='secant' (works for every supported optimizer) or 'sgd'")
