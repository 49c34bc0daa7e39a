"""Bad input gets one clear error naming the problem, and nothing is half-applied (no optimizer step,
no leftover gradient, parameters restored from the midpoint shift)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardshap
from shardshap import AttributionError, Config, ConfigError, UnsupportedModule, UnsupportedOptimizer
from shardshap.testing import cases


@pytest.fixture
def setup():
    case = cases.digits_mlp(batch_size=6)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss)
    b, ids = case.batches(0)
    attr.step(b, ids, None)  # warm state, so "nothing changed" is a real check
    return case, opt, attr


def snapshot(model, opt):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def assert_untouched(before, model, opt):
    params, state = before
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
        assert p.grad is None
    now = opt.state_dict()["state"]
    for k in state["state"]:
        for name, v in state["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(now[k][name]))


def test_wrong_loss_shape(setup):
    case, opt, attr = setup
    before = snapshot(case.model, opt)
    attr.train_loss = lambda m, b: case.train_loss(m, b).mean()
    b, ids = case.batches(1)
    with pytest.raises(AttributionError, match=r"train_loss returned shape \(\) .* one loss per sample"):
        attr.step(b, ids, None)
    assert_untouched(before, case.model, opt)


def test_sample_ids_length_mismatch(setup):
    case, opt, attr = setup
    before = snapshot(case.model, opt)
    b, ids = case.batches(1)
    with pytest.raises(ValueError, match=r"shape \(6, 64\) but sample_ids gives this micro-batch 5 samples"):
        attr.step(b, ids[:5], None)
    assert_untouched(before, case.model, opt)


def test_non_finite_loss(setup):
    case, opt, attr = setup
    before = snapshot(case.model, opt)
    (x, y), ids = case.batches(1)
    x = x.clone()
    x[2] = float("nan")
    with pytest.raises(AttributionError, match=r"not finite for samples at positions \[2\]"):
        attr.step((x, y), ids, None)
    assert_untouched(before, case.model, opt)


def test_bad_target_loss_restores_midpoint_shift(setup):
    case, opt, attr = setup
    before = snapshot(case.model, opt)
    b, ids = case.batches(1)
    attr.target_loss = lambda m, t: case.target_loss(m, t) * float("inf")
    with pytest.raises(AttributionError, match="target_loss is not finite"):
        attr.step(b, ids, None)
    assert_untouched(before, case.model, opt)
    attr.target_loss = lambda m, t: case.target_loss(m, t).reshape(1, 2)
    with pytest.raises(AttributionError, match="0-d tensor .* 1-d tensor"):
        attr.step(b, ids, None)
    assert_untouched(before, case.model, opt)


def test_micro_batch_list_mismatch(setup):
    case, opt, attr = setup
    b, ids = case.batches(1)
    with pytest.raises(AttributionError, match="list of 2 id lists, so batch must be a list of as many"):
        attr.step(b, [ids[:3], ids[3:]], None)


def test_unsupported_optimizer():
    case = cases.digits_mlp()
    opt = torch.optim.RMSprop(case.model.parameters())
    with pytest.raises(UnsupportedOptimizer,
                       match=r"no update rule for optimizer torch.optim.rmsprop.RMSprop.*supported"):
        shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss)
    sgd = torch.optim.SGD(case.model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedOptimizer, match="adam-lagged.*needs torch.optim.Adam or AdamW"):
        shardshap.Attributor(case.model, sgd, case.train_loss, case.target_loss, Config(estimator="adam-lagged"))


class FunctionalTie(nn.Module):
    """Uses a Linear's weight a second time through F.linear: invisible to the module hooks."""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(F.linear(self.a(x).tanh(), self.a.weight))


@pytest.mark.parametrize("dtype,cache,autocast", [(torch.float64, None, False), (torch.float32, "bfloat16", False),
                                                   (torch.float32, None, True)])
def test_functional_reuse_is_caught_not_silently_wrong(dtype, cache, autocast):
    """Also with bf16 products or a bf16 autocast forward, whose check allows 5% of rounding per layer."""
    torch.manual_seed(0)
    model = FunctionalTie().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return m(b).float().pow(2).sum(1)
    attr = shardshap.Attributor(model, opt, loss, lambda m, t: m(t).pow(2).mean(), Config(cache_dtype=cache))
    with pytest.raises(AttributionError, match=r"do not add up to the batch gradient for: a.weight"):
        attr.step(torch.randn(5, 4, dtype=dtype), torch.arange(5), torch.randn(3, 4, dtype=dtype))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_unsupported_module_lists_parameter_and_exclusion_is_recorded():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
            self.gate = nn.Parameter(torch.ones(10, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) * self.gate

    case = cases.digits_mlp()
    model = Gate().double()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(UnsupportedModule, match=r"gate \(in Gate\)"):
        shardshap.Attributor(model, opt, case.train_loss, case.target_loss)
    attr = shardshap.Attributor(model, opt, case.train_loss, case.target_loss, Config(exclude=["gate"]))
    b, ids = case.batches(0)
    out = attr.step(b, ids, None)
    assert out.metadata["excluded"] == ["gate"]


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"Config.estimator='adam' is not allowed; choose one of 'secant'"):
        Config(estimator="adam")
    with pytest.raises(ConfigError, match="Config.order=3"):
        Config(order=3)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        Config(max_grad_norm=-1.0)
    p = tmp_path / "c.yaml"
    p.write_text("shardshap:\n  estimator: sgd\n  order: 1\n  max_grad_norm: 1.0\n")
    cfg = Config.from_file(p, section="shardshap")
    assert (cfg.estimator, cfg.order, cfg.max_grad_norm) == ("sgd", 1, 1.0)
    p.write_text("estimater: sgd\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'estimater' \(did you mean 'estimator'\?\)"):
        Config.from_file(p)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"reduction": "median"}))
    with pytest.raises(ConfigError, match=r"c.json: Config.reduction='median'.*'mean', 'sum'"):
        Config.from_file(j)
    assert set(Config.fields_help()) == {f for f in Config().to_dict()}
    assert all(len(h) > 20 for h in Config.fields_help().values())
