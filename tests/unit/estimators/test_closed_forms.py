"""Closed forms vs the oracle's exact Shapley values of the Taylor-truncated one-step games.

With an affine update map (SGD with momentum, dampening, Nesterov, weight decay, a frozen clip
factor) the secant estimator is the exact Shapley value of the first-order game (order 1) and of the
second-order game (order 2 with curvature='hvp'); paper A's SGD proxy is exact for plain SGD.
"""
import copy

import pytest
import torch

import shardshap
from shardshap import oracle
from shardshap.testing import cases


def warm(case, opt, steps):
    for s in range(steps):
        (b, _) = case.batches(s)
        opt.zero_grad()
        case.train_loss(case.model, b).mean().backward()
        opt.step()


def closed_form(case, opt, cfg, step):
    m2, o2 = copy.deepcopy((case.model, opt))
    attr = shardshap.Attributor(m2, o2, case.train_loss, case.target_loss, cfg)
    b, ids = case.batches(step)
    out = attr.step(b, ids, None)
    if cfg.max_grad_norm is not None:
        assert out.clip_factor < 1.0, "the clipping case must actually clip"
    return out.scores


OPTIMIZERS = {
    "sgd-momentum-wd-clip": (dict(lr=0.05, momentum=0.9, weight_decay=0.01), 0.05),
    "sgd-nesterov-dampening": (dict(lr=0.05, momentum=0.8, dampening=0.3, nesterov=False, weight_decay=0.0), None),
    "sgd-nesterov": (dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), None),
}


@pytest.mark.parametrize("make", [cases.digits_mlp, cases.tiny_gpt2])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_secant_is_exact_shapley_of_truncated_games(make, opt_name):
    kwargs, clip = OPTIMIZERS[opt_name]
    case = make(batch_size=8)
    opt = torch.optim.SGD(case.model.parameters(), **kwargs)
    warm(case, opt, 3)
    b, _ = case.batches(3)
    for order, utility in [(1, "taylor1"), (2, "taylor2")]:
        truth = oracle.shapley(case.model, opt, case.train_loss, case.target_loss, b, None,
                               max_grad_norm=clip, utility=utility).shapley
        cfg = shardshap.Config(estimator="secant", order=order, curvature="hvp", max_grad_norm=clip)
        ours = closed_form(case, opt, cfg, 3)
        err = ((ours - truth).abs().max() / truth.abs().max()).item()
        assert err <= 1e-8, f"{opt_name} order {order}: relative error {err:.2e}"


@pytest.mark.parametrize("make", [cases.digits_mlp, cases.tiny_llama])
def test_sgd_proxy_is_exact_for_plain_sgd(make):
    case = make(batch_size=8)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    warm(case, opt, 2)
    b, _ = case.batches(2)
    for order, utility in [(1, "taylor1"), (2, "taylor2")]:
        truth = oracle.shapley(case.model, opt, case.train_loss, case.target_loss, b, None, utility=utility).shapley
        ours = closed_form(case, opt, shardshap.Config(estimator="sgd", order=order, curvature="hvp"), 2)
        err = ((ours - truth).abs().max() / truth.abs().max()).item()
        assert err <= 1e-8, f"order {order}: relative error {err:.2e}"


def test_first_order_is_not_exact_for_the_second_order_game():
    """Guards the test above against a vacuous pass: the games really differ at this learning rate."""
    case = cases.digits_mlp(batch_size=8)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.5, momentum=0.9)
    warm(case, opt, 3)
    b, _ = case.batches(3)
    truth = oracle.shapley(case.model, opt, case.train_loss, case.target_loss, b, None, utility="taylor2").shapley
    ours = closed_form(case, opt, shardshap.Config(estimator="secant", order=1), 3)
    assert ((ours - truth).abs().max() / truth.abs().max()).item() > 1e-4
