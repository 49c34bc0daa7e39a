"""torch.optim.Adam / AdamW: bias correction, eps, L2 or decoupled weight decay, amsgrad, maximize."""
from __future__ import annotations

import functools
import warnings

import torch

from ..errors import UnsupportedOptimizer
from ..foreach import batched
from .base import StepMap, UpdateRule, scalar


def adamw_secant(g, m, v, theta, lr, b1, b2, eps, wd, bc1, bc2, sign):
    """(D(0), secant slope) of one AdamW step with decoupled weight decay `wd` (0: none), no amsgrad, for
    flat tensors, in about 15 passes over the parameter written in place; `compiled_adamw_secant` fuses
    them into one."""
    r0_sq = v * (b2 / bc2)                                   # vhat(0)
    a1 = torch.addcmul(r0_sq, g, g, value=(1 - b2) / bc2).sqrt_()  # r1 = sqrt(vhat(G)), then r1 + eps
    a0 = r0_sq.sqrt_()                                        # r0, then r0 + eps
    # q = u1 / (r0 + r1) is bounded (r1 >= |u1| sqrt((1-b2)/bc2)); the clamp only turns 0/0 into 0
    q = torch.div(g, torch.add(a0, a1).clamp_min_(torch.finfo(g.dtype).tiny))
    a0.add_(eps)
    a1.add_(eps)
    p = torch.div(m, a0)                                      # mhat0 / (r0 + eps) = p * b1 / bc1
    d0 = p * (-lr * b1 / bc1)
    if wd != 0:
        d0.add_(theta, alpha=-lr * wd)
    # slope = -lr sign ((1-b1)/bc1 - mhat0 (1-b2) u1 / (bc2 (r0 + r1) (r0 + eps))) / (r1 + eps), u1 = sign g
    slope = p.mul_(q).mul_(lr * b1 * (1 - b2) / (bc1 * bc2)).sub_(lr * sign * (1 - b1) / bc1).div_(a1)
    return d0, slope


def adamw_secant_foreach(g, m, v, theta, hyper):
    """`adamw_secant` over lists of flat tensors at once (`hyper`: one (lr, b1, b2, eps, wd, bc1, bc2, sign)
    per tensor), in about 17 foreach kernels for all of them instead of 15 kernels per parameter. Returns the
    lists (D(0), slope)."""
    lr, b1, b2, eps, wd, bc1, bc2, sign = (list(x) for x in zip(*hyper))
    r0_sq = torch._foreach_mul(v, [b / c for b, c in zip(b2, bc2)])
    a1 = torch._foreach_addcmul(r0_sq, g, g, [(1 - b) / c for b, c in zip(b2, bc2)])
    torch._foreach_sqrt_(a1)
    torch._foreach_sqrt_(r0_sq)
    a0 = r0_sq
    rsum = torch._foreach_add(a0, a1)
    torch._foreach_clamp_min_(rsum, torch.finfo(g[0].dtype).tiny)
    q = torch._foreach_div(g, rsum)
    torch._foreach_add_(a0, eps)
    torch._foreach_add_(a1, eps)
    p = torch._foreach_div(m, a0)
    d0 = torch._foreach_mul(p, [-lr_ * b1_ / c for lr_, b1_, c in zip(lr, b1, bc1)])
    decayed = [i for i, w in enumerate(wd) if w != 0]
    if decayed:
        torch._foreach_add_([d0[i] for i in decayed],
                        torch._foreach_mul([theta[i] for i in decayed], [-lr[i] * wd[i] for i in decayed]))
    torch._foreach_mul_(p, q)
    torch._foreach_mul_(p, [lr_ * b1_ * (1 - b2_) / (c1 * c2) for lr_, b1_, b2_, c1, c2 in zip(lr, b1, b2, bc1, bc2)])
    torch._foreach_sub_(p, [lr_ * s * (1 - b1_) / c1 for lr_, s, b1_, c1 in zip(lr, sign, b1, bc1)])
    torch._foreach_div_(p, a1)
    return d0, p


def _adamw_secant_functional(g, m, v, theta, hyper):
    """`adamw_secant` without in-place ops and with the hyperparameters in one tensor, for torch.compile:
    inductor mis-compiles the in-place form under dynamic shapes (tests/unit/optim catch it against the real
    optimizer), and Python-float hyperparameters would become symbolic scalars that slow the fused loop
    (docs/benchmarks.md). Eager, this form is slower than the in-place one, which stays for eager."""
    lr, b1, b2, eps, wd, bc1, bc2, sign = hyper.unbind()
    r0 = (v * (b2 / bc2)).sqrt()
    r1 = (v * (b2 / bc2) + g * g * ((1 - b2) / bc2)).sqrt()
    q = g / (r0 + r1).clamp_min(torch.finfo(g.dtype).tiny)
    p = m / (r0 + eps)
    d0 = p * (-lr * b1 / bc1) - (lr * wd) * theta
    slope = (p * q * (lr * b1 * (1 - b2) / (bc1 * bc2)) - lr * sign * (1 - b1) / bc1) / (r1 + eps)
    return d0, slope, d0 + 0.5 * slope * g  # the midpoint shift on the way: one pass fewer


@functools.lru_cache(maxsize=64)
def _hyper_tensor(hyper: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The hyperparameters as one tensor, made once per distinct set (a host-to-device copy on GPUs)."""
    return torch.tensor(hyper, dtype=dtype, device=device)


@functools.cache
def compiled_adamw_secant():
    """`adamw_secant` through torch.compile (Config.compile_math), returning (D(0), slope, midpoint shift)
    (shift None where it falls back): one fused pass instead of ~15, compiled
    once per process and dtype (sizes dynamic, hyperparameters passed as a tensor, so neither recompiles).
    Falls back to eager, with a warning, where compilation fails (e.g. no C++ compiler for inductor on CPU)."""
    fused = torch.compile(_adamw_secant_functional, dynamic=True)
    failed = False

    def run(g, m, v, theta, *hyper):
        nonlocal failed
        if not failed:
            try:
                return fused(g, m, v, theta, _hyper_tensor(hyper, g.dtype, g.device))
            except Exception as err:  # noqa: BLE001  (any compiler failure falls back to the same math)
                failed = True
                warnings.warn(f"Config.compile_math: torch.compile failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); using the eager "
                              "secant math (same values, slower).", stacklevel=2)
        d0, slope = adamw_secant(g, m, v, theta, *hyper)
        return d0, slope, None
    return run


class AdamRule(UpdateRule):
    name = "Adam/AdamW"

    def __init__(self, decoupled_default: bool):
        self.decoupled_default = decoupled_default  # AdamW decays decoupled; Adam unless it says otherwise

    def check(self, optimizer) -> None:
        for group in optimizer.param_groups:
            if group.get("differentiable", False):
                raise UnsupportedOptimizer("Adam(differentiable=True) is not supported; create it without it")

    def _hyper(self, param, group, state):
        b1, b2 = (scalar(b) for b in group["betas"])
        t = (scalar(state["step"]) if "step" in state else 0.0) + 1.0  # the step about to be taken
        decoupled = group.get("decoupled_weight_decay", False) or self.decoupled_default
        return scalar(group["lr"]), b1, b2, scalar(group["eps"]), scalar(group["weight_decay"]), t, decoupled

    def step_number(self, state) -> int:
        return int(scalar(state["step"])) + 1 if "step" in state else 1

    def _frozen(self, param, group, state, dtype):
        lr, b1, b2, eps, wd, t, decoupled = self._hyper(param, group, state)
        theta = param.detach().to(dtype)
        m = state["exp_avg"].detach().to(dtype) if "exp_avg" in state else torch.zeros_like(theta)
        v = state["exp_avg_sq"].detach().to(dtype) if "exp_avg_sq" in state else torch.zeros_like(theta)
        vmax = None
        if group.get("amsgrad", False):
            vmax = (state["max_exp_avg_sq"].detach().to(dtype) if "max_exp_avg_sq" in state
                    else torch.zeros_like(theta))
        u0 = torch.zeros_like(theta) if (decoupled or wd == 0) else wd * theta  # optimizer input at G = 0
        decay = -lr * wd * theta if decoupled else torch.zeros_like(theta)
        sign = -1.0 if group.get("maximize", False) else 1.0
        return lr, b1, b2, eps, 1 - b1 ** t, 1 - b2 ** t, m, v, vmax, u0, decay, sign

    def expected_grad(self, param, group, state, dtype):
        if "exp_avg" not in state or scalar(state.get("step", 0)) == 0:
            return None
        lr, b1, b2, eps, wd, t, decoupled = self._hyper(param, group, state)
        u = state["exp_avg"].detach().to(dtype) / (1 - b1 ** (t - 1))  # the optimizer's input, as m expects it
        if not decoupled and wd != 0:
            u = u - wd * param.detach().to(dtype)
        return -u if group.get("maximize", False) else u

    def displacement_fn(self, param, group, state, dtype):
        lr, b1, b2, eps, bc1, bc2, m, v, vmax, u0, decay, sign = self._frozen(param, group, state, dtype)

        def D(g):
            u = u0 + sign * g
            v1 = b2 * v + (1 - b2) * u * u
            if vmax is not None:
                v1 = torch.maximum(vmax, v1)
            return decay - lr * (b1 * m + (1 - b1) * u) / bc1 / ((v1 / bc2).sqrt() + eps)
        return D

    def step_map(self, param, grad, group, state, dtype, compiled=False) -> StepMap:
        hyper = self._hyper(param, group, state)
        lr, b1, b2, eps, wd, t, decoupled = hyper
        if (decoupled or wd == 0) and not group.get("amsgrad", False):
            return self._step_map_fused(param, grad, group, state, dtype, hyper, compiled)
        lr, b1, b2, eps, bc1, bc2, m, v, vmax, u0, decay, sign = self._frozen(param, group, state, dtype)
        g = grad.detach().to(dtype)
        u1 = u0 + sign * g
        mhat0 = (b1 * m + (1 - b1) * u0) / bc1
        v0 = b2 * v + (1 - b2) * u0 * u0
        v1 = b2 * v + (1 - b2) * u1 * u1
        if vmax is not None:
            v0, v1 = torch.maximum(vmax, v0), torch.maximum(vmax, v1)
        r0, r1 = (v0 / bc2).sqrt(), (v1 / bc2).sqrt()
        a0, a1 = r0 + eps, r1 + eps
        d0 = decay - lr * mhat0 / a0
        if vmax is not None:
            # max() breaks the closed form below: difference quotient, derivative where G == 0
            d1 = decay - lr * (b1 * m + (1 - b1) * u1) / bc1 / a1
            safe = torch.where(g != 0, g, torch.ones_like(g))
            slope = torch.where(g != 0, (d1 - d0) / safe, -lr * sign * (1 - b1) / (bc1 * a0))
            return StepMap(d0=d0, slope=slope)
        # Closed-form secant of u -> -lr * mhat(u) / (sqrt(vhat(u)) + eps) between u0 and u1, written so
        # that nothing cancels when G is small (the naive (D(G) - D(0)) / G loses all digits there).
        rsum = r0 + r1
        curve = torch.where(rsum > 0, mhat0 * (1 - b2) * (u0 + u1) / (bc2 * torch.where(rsum > 0, rsum, 1.0) * a0 * a1),
                            torch.zeros_like(g))
        slope = -lr * sign * ((1 - b1) / (bc1 * a1) - curve)
        return StepMap(d0=d0, slope=slope)

    def step_maps(self, shards, dtype, compiled=False) -> list[StepMap]:
        """The common case (AdamW or no weight decay, no amsgrad) of every parameter at once, by
        `adamw_secant_foreach`, where kernels are batched (foreach.batched: about 17 launches for all
        parameters, fewer than one compiled kernel per parameter); on a CPU and in other cases per parameter,
        compiled with Config.compile_math."""
        maps: list = [None] * len(shards)
        fused = []
        at_once = bool(shards) and batched(shards[0].value.device)
        for i, sh in enumerate(shards):
            lr, b1, b2, eps, wd, t, decoupled = self._hyper(sh.value, sh.group, sh.state)
            if not at_once or not (decoupled or wd == 0) or sh.group.get("amsgrad", False):
                maps[i] = self.step_map(sh.value, sh.grad, sh.group, sh.state, dtype, compiled)
            else:
                sign = -1.0 if sh.group.get("maximize", False) else 1.0
                fused.append((i, (lr, b1, b2, eps, wd if decoupled else 0.0, 1 - b1 ** t, 1 - b2 ** t, sign)))
        if fused:
            flat = [self._flat_state(shards[i].value, shards[i].grad, shards[i].state, dtype) for i, _ in fused]
            d0, slope = adamw_secant_foreach(*map(list, zip(*flat)), [hyper for _, hyper in fused])
            for (i, _), d, s in zip(fused, d0, slope):
                shape = shards[i].grad.shape
                maps[i] = StepMap(d0=d.view(shape), slope=s.view(shape))
        return maps

    @staticmethod
    def _flat_state(param, grad, state, dtype):
        """(g, m, v, theta), flat, in `dtype` (m = v = 0 before the first step)."""
        g = grad.detach().to(dtype).reshape(-1)
        if "exp_avg" not in state:
            m = v = torch.zeros_like(g)
        else:
            m = state["exp_avg"].detach().to(dtype).reshape(-1)
            v = state["exp_avg_sq"].detach().to(dtype).reshape(-1)
        return g, m, v, param.detach().to(dtype).reshape(-1)

    def _step_map_fused(self, param, grad, group, state, dtype, hyper, compiled) -> StepMap:
        """step_map's closed-form secant for the common case (AdamW or no weight decay, no amsgrad: the
        optimizer input at G = 0 is 0), by `adamw_secant`."""
        lr, b1, b2, eps, wd, t, decoupled = hyper
        sign = -1.0 if group.get("maximize", False) else 1.0
        args = (*self._flat_state(param, grad, state, dtype),
                lr, b1, b2, eps, wd if decoupled else 0.0, 1 - b1 ** t, 1 - b2 ** t, sign)
        d0, slope, shift = compiled_adamw_secant()(*args) if compiled else (*adamw_secant(*args), None)
        shape = grad.shape
        return StepMap(d0=d0.view(shape), slope=slope.view(shape), shift=None if shift is None else shift.view(shape))

    def lagged_scale(self, param, group, state, dtype) -> torch.Tensor:
        lr, b1, b2, eps, wd, t, decoupled = self._hyper(param, group, state)
        theta = param.detach().to(dtype)
        v = state["exp_avg_sq"].detach().to(dtype) if "exp_avg_sq" in state else torch.zeros_like(theta)
        vhat_prev = v / (1 - b2 ** (t - 1)) if t > 1 else v  # v_0 = 0: the form is singular at step 1
        sign = -1.0 if group.get("maximize", False) else 1.0
        return sign * lr * (1 - b1) / (1 - b1 ** t) / (vhat_prev.sqrt() + eps)
