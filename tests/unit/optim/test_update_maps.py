"""The frozen update maps of shardshap.optim against the real torch optimizers (float64).

`step_map(G).displacement(G)` must equal the parameter change of `optimizer.step()` with gradient G,
and the secant slope must stay accurate where G -> 0 (no cancellation): there it tends to the
derivative of the real update map, taken here by autograd.
"""
import copy
import shutil
import warnings

import pytest
import torch

from shardshap.optim import update_rule_for

torch_opts = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)),
    "adamw-maximize": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam-l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    "adam-decoupled": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)),
}


def optimizer_at(name: str, warm_steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(64, generator=gen, dtype=torch.float64))
    cls, kw = torch_opts[name]
    opt = cls([p], **kw)
    for _ in range(warm_steps):
        p.grad = torch.randn(64, generator=gen, dtype=torch.float64) * torch.logspace(-6, 0, 64, dtype=torch.float64)
        opt.step()
    return p, opt


def real_displacement(p, opt, grad):
    p2, opt2 = copy.deepcopy((p, opt))  # deepcopy together keeps the state keyed by the copied parameter
    p2.grad = grad.clone()
    before = p2.detach().clone()
    opt2.step()
    return p2.detach() - before


# the optimizers whose secant has a torch.compile'd kernel (Config.compile_math)
FUSED = ["adamw", "adamw-maximize", "adam", "adam-decoupled"]


@pytest.mark.parametrize("warm_steps", [0, 5])
@pytest.mark.parametrize("name,compiled", [(n, False) for n in torch_opts] + [(n, True) for n in FUSED])
def test_step_map_is_the_real_step(name, compiled, warm_steps):
    p, opt = optimizer_at(name, warm_steps)
    rule = update_rule_for(opt)
    group, state = opt.param_groups[0], opt.state[p]
    g = torch.randn(64, dtype=torch.float64) * torch.logspace(-5, 0, 64, dtype=torch.float64)
    g[3] = 0.0  # a coordinate without gradient
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = rule.step_map(p, g, group, state, torch.float64, compiled=compiled)
    if compiled and shutil.which("c++"):  # else the eager fallback is what runs, and is checked here too
        assert not [w for w in caught if "torch.compile failed" in str(w.message)], "compiled kernel fell back"
    real, real0 = real_displacement(p, opt, g), real_displacement(p, opt, torch.zeros_like(g))
    torch.testing.assert_close(step.displacement(g), real, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(step.displacement(torch.zeros_like(g)), real0, rtol=1e-10, atol=1e-15)
    if step.shift is not None:  # the fused kernel's midpoint shift
        torch.testing.assert_close(step.shift, (real + real0) / 2, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", ["adamw", "adamw-maximize", "adam", "adam-l2", "adam-decoupled"])
def test_secant_slope_tends_to_the_derivative(name):
    p, opt = optimizer_at(name, 5)
    rule = update_rule_for(opt)
    group, state = opt.param_groups[0], opt.state[p]
    D = rule.displacement_fn(p, group, state, torch.float64)
    direction = torch.randn(64, dtype=torch.float64)
    tiny = 1e-13 * direction
    slope = rule.step_map(p, tiny, group, state, torch.float64).slope
    derivative = torch.func.jacfwd(D)(torch.zeros(64, dtype=torch.float64)).diagonal()
    torch.testing.assert_close(slope, derivative, rtol=1e-6, atol=0)


def test_compiled_kernel_falls_back_to_eager(monkeypatch):
    """Where torch.compile fails (no C++ compiler, ...), compile_math warns once and computes the same map."""
    from shardshap.optim import adam

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler found")
        return run
    adam.compiled_adamw_secant.cache_clear()
    monkeypatch.setattr(torch, "compile", broken)
    try:
        p, opt = optimizer_at("adamw", 5)
        rule = update_rule_for(opt)
        group, state = opt.param_groups[0], opt.state[p]
        g = torch.randn(64, dtype=torch.float64)
        with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
            step = rule.step_map(p, g, group, state, torch.float64, compiled=True)
        torch.testing.assert_close(step.displacement(g), real_displacement(p, opt, g), rtol=1e-10, atol=1e-15)
    finally:
        adam.compiled_adamw_secant.cache_clear()  # the next user compiles for real


@pytest.mark.parametrize("at_once", [True, False])
@pytest.mark.parametrize("warm_steps", [0, 5])
def test_step_maps_of_many_parameters_are_their_real_steps(warm_steps, at_once, monkeypatch):
    """`step_maps` takes a step's parameters at once (foreach kernels for the common Adam case, where kernels
    are batched): across parameter groups with other hyperparameters, amsgrad and L2 decay among them, each
    map is the real step."""
    from shardshap import foreach
    from shardshap.backends import OwnedSlice
    monkeypatch.setattr(foreach, "BATCH_KERNELS", at_once)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (64, 7, 33, 5)]
    opt = torch.optim.Adam([{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
                            {"params": params[2:3], "lr": 3e-3, "betas": (0.8, 0.9), "maximize": True},
                            {"params": params[3:], "lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}])
    for _ in range(warm_steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 1e-2 for p in params]
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    shards = [OwnedSlice(p, p.detach(), g, opt.state.get(p, {}), group_of[id(p)]) for p, g in zip(params, grads)]
    maps = update_rule_for(opt).step_maps(shards, torch.float64)
    for p, g, step in zip(params, grads, maps):
        real, real0 = real_displacement(p, opt, g), real_displacement(p, opt, torch.zeros_like(g))
        torch.testing.assert_close(step.displacement(g), real, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(step.displacement(torch.zeros_like(g)), real0, rtol=1e-10, atol=1e-15)
