"""torch.optim.SGD: momentum, dampening, Nesterov, weight decay, maximize. D is affine in G."""
from __future__ import annotations

from typing import Optional

import torch

from .base import StepMap, UpdateRule, scalar


class SGDRule(UpdateRule):
    name = "SGD"

    def step_map(self, param, grad, group, state, dtype, compiled=False) -> StepMap:
        lr, mu = scalar(group["lr"]), scalar(group["momentum"])
        damp, wd = scalar(group["dampening"]), scalar(group["weight_decay"])
        sign = -1.0 if group.get("maximize", False) else 1.0
        theta = param.detach().to(dtype)
        u0 = wd * theta  # the optimizer's input when G = 0 (L2 weight decay is added to the gradient)
        buf = state.get("momentum_buffer") if mu != 0 else None
        if mu == 0:
            direction0, du = u0, 1.0
        elif buf is None:  # first step: the buffer is initialised to the gradient itself, undamped
            direction0, du = (1 + mu) * u0 if group["nesterov"] else u0, (1 + mu) if group["nesterov"] else 1.0
        else:
            new_buf0 = mu * buf.detach().to(dtype) + (1 - damp) * u0
            if group["nesterov"]:
                direction0, du = u0 + mu * new_buf0, 1 + mu * (1 - damp)
            else:
                direction0, du = new_buf0, 1 - damp
        slope = torch.full_like(theta, -lr * du * sign)
        return StepMap(d0=-lr * direction0, slope=slope)

    def expected_grad(self, param, group, state, dtype) -> Optional[torch.Tensor]:
        mu, damp = scalar(group["momentum"]), scalar(group["dampening"])
        buf = state.get("momentum_buffer") if mu != 0 else None
        if buf is None or damp >= 1:
            return None
        # the buffer's steady state is (1 - damp) / (1 - mu) times the optimizer's input u = sign g + wd theta
        u = buf.detach().to(dtype) * ((1 - mu) / (1 - damp)) - scalar(group["weight_decay"]) * param.detach().to(dtype)
        return -u if group.get("maximize", False) else u
