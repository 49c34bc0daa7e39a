"""Bad input to the API, Config and the trainer config: one ShardshapError whose message names the problem
and the fix, and nothing half-applied. For a refused step: parameters, optimizer state and the store (its
arrays and committed markers, read with plain zarr) are unchanged, and the next good step is written as the
step that was refused (no step index lost). The store and CLI cases are in tests/unit/store."""
import copy

import numpy as np
import pytest
import torch
import zarr

import shardshap
from shardshap import Config
from shardshap.errors import (
    AttributionError,
    BatchShapeError,
    ConfigError,
    ShardshapError,
    StoreError,
    UnsupportedOptimizer,
)
from shardshap.testing import cases

N = 1797  # sample ids index the digits data set


@pytest.fixture
def warm(tmp_path):
    """An Attributor with a store, one step taken (warm Adam state, the store created)."""
    case = cases.digits_mlp(batch_size=6)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                Config(num_samples=N, max_grad_norm=1.0), store=str(tmp_path / "s.zarr"))
    b, ids = case.batches(0)
    attr.step(b, ids, None)
    yield case, opt, attr, tmp_path / "s.zarr"
    attr.close()


def _state(model, opt, store):
    params = [p.detach().clone() for p in model.parameters()]
    arrays = None
    if store is not None and store.exists():
        g = zarr.open_group(str(store), mode="r")
        arrays = {n: np.asarray(g[n][:]) for n in ("committed_step", "written_step", "sample_id", "score")}
    return params, copy.deepcopy(opt.state_dict()), arrays


def _assert_unchanged(before, model, opt, store):
    params, opt_state, arrays = before
    now = _state(model, opt, store)
    assert all(torch.equal(p, q) for p, q in zip(params, now[0])), "parameters changed"
    assert all(p.grad is None for p in model.parameters()), "a gradient was left behind"
    for k, st in opt_state["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(now[1]["state"][k][name])), "optimizer state"
    if arrays is not None:
        for name, a in arrays.items():
            np.testing.assert_array_equal(a, now[2][name], err_msg=f"store array {name} changed")


def _mutate(case, what):
    """(batch, ids, targets, train_loss, target_loss) of step 1 with one thing wrong."""
    (x, y), ids = case.batches(1)
    tl, gl = case.train_loss, case.target_loss
    batch, targets = (x, y), None
    if what == "loss shape":
        tl = lambda m, b: case.train_loss(m, b).mean()
    elif what == "loss list":
        tl = lambda m, b: list(case.train_loss(m, b))
    elif what == "loss no graph":
        def tl(m, b):
            with torch.no_grad():
                return case.train_loss(m, b)
    elif what == "loss not finite":
        x = x.clone()
        x[2] = float("nan")
        batch = (x, y)
    elif what == "ids short":
        ids = ids[:5]
    elif what == "ids float":
        ids = ids.double()
    elif what == "ids 2-D":
        ids = ids.reshape(2, 3)
    elif what == "ids empty":
        batch, ids = (x[:0], y[:0]), ids[:0]
    elif what == "no micro-batch":
        batch, ids = [], []
    elif what == "ids duplicate":
        ids = ids.clone()
        ids[1] = ids[0]
    elif what == "ids too large":
        ids = ids.clone()
        ids[0] = N
    elif what == "ids negative":
        ids = ids.clone()
        ids[0] = -1
    elif what == "micro-batch count":
        ids = [ids[:3], ids[3:]]
    elif what == "target no graph":
        def gl(m, t):
            with torch.no_grad():
                return case.target_loss(m, t)
    elif what == "target not finite":
        gl = lambda m, t: case.target_loss(m, t) * float("inf")
    elif what == "target 2-D":
        gl = lambda m, t: case.target_loss(m, t).reshape(1, 2)
    elif what == "target float":
        gl = lambda m, t: float(case.target_loss(m, t)[0])
    elif what == "target empty":
        gl = lambda m, t: case.target_loss(m, t)[:0]
    elif what == "target per token":  # flattened per-example losses instead of one mean per target
        gl = lambda m, t: case.target_loss(m, t).repeat(40)
    elif what == "too many samples for the store":
        (x, y), ids = cases.digits_mlp(batch_size=9).batches(1)
        batch = (x, y)
    return batch, ids, targets, tl, gl


STEP_CASES = [  # what is wrong, the error class, what the message must say (the problem and the fix)
    ("loss shape", AttributionError, r"returned shape \(\).*one loss per sample, shape \[6\]"),
    ("loss list", AttributionError, "must return a Tensor of per-sample losses, got list"),
    ("loss no graph", AttributionError, "train_loss returned a tensor without a graph.*gradients enabled"),
    ("loss not finite", AttributionError, r"not finite for samples at positions \[2\]"),
    ("ids short", BatchShapeError, "sample_ids gives this micro-batch 5 samples"),
    ("ids float", AttributionError, r"must be a 1-D integer tensor or list .* got dtype torch.float64"),
    ("ids 2-D", AttributionError, r"input of shape \(6, 64\) but sample_ids gives this micro-batch 2 samples"),
    ("ids empty", AttributionError, "no samples .*pass at least one sample"),
    ("no micro-batch", AttributionError, "no samples .*pass at least one sample"),
    ("ids duplicate", AttributionError, "duplicates within one optimizer step; each sample of a step needs its own id"),
    ("ids too large", AttributionError, r"outside \[0, num_samples=1797\).*set Config\(num_samples"),
    ("ids negative", AttributionError, r"\[-1\] are outside \[0, num_samples"),
    ("micro-batch count", AttributionError, "list of 2 id lists, so batch must be a list of as many micro-batches"),
    ("target no graph", AttributionError, "target_loss returned a tensor without a graph.*gradients enabled"),
    ("target not finite", AttributionError, "target_loss is not finite"),
    ("target 2-D", AttributionError, r"0-d tensor \(one target\) or a 1-d tensor \[K\].*shape \(1, 2\)"),
    ("target float", AttributionError, "0-d tensor .* got float"),
    ("target empty", AttributionError, r"1-d tensor \[K\].*shape \(0,\)"),
    ("target per token", AttributionError, "returned 80 losses.*reduction is probably missing.*target_names"),
    ("too many samples for the store", StoreError,
     r"9 players \(samples or documents\) on rank 0, but the store has 6 slots per rank"),
]


@pytest.mark.parametrize("what, error, message", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_bad_step_is_refused_and_nothing_changes(warm, what, error, message):
    case, opt, attr, store = warm
    before = _state(case.model, opt, store)
    batch, ids, targets, attr.train_loss, attr.target_loss = _mutate(case, what)
    with pytest.raises(error, match=message) as err:
        attr.step(batch, ids, targets)
    assert isinstance(err.value, ShardshapError)
    _assert_unchanged(before, case.model, opt, store)
    attr.train_loss, attr.target_loss = case.train_loss, case.target_loss
    b, good = case.batches(1)
    assert attr.step(b, good, None).step == 1  # the refused step did not advance the count
    attr.flush()
    assert int(zarr.open_group(str(store), mode="r")["committed_step"][0]) == 1


def test_store_of_another_run_is_refused_before_the_first_step_trains(warm):
    case, opt, attr, store = warm
    attr.flush()
    other = cases.digits_mlp(batch_size=6, seed=1)
    opt2 = torch.optim.AdamW(other.model.parameters(), lr=1e-2)
    second = shardshap.Attributor(other.model, opt2, other.train_loss, other.target_loss,
                                  Config(num_samples=N, estimator="sgd"), store=str(store))
    before = _state(other.model, opt2, store)
    b, ids = other.batches(0)
    with pytest.raises(StoreError, match="belongs to another run.*new store path.*overwrite=True"):
        second.step(b, ids, None)
    _assert_unchanged(before, other.model, opt2, store)
    assert second.step_index == 0


def test_store_path_that_is_a_file_is_refused_before_training(tmp_path):
    case = cases.digits_mlp(batch_size=6)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    path = tmp_path / "not-a-store"
    path.write_text("hello")
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, Config(num_samples=N),
                                store=str(path))
    before = _state(case.model, opt, None)
    with pytest.raises(StoreError, match="not-a-store"):
        attr.step(*case.batches(0), None)
    _assert_unchanged(before, case.model, opt, None)
    assert path.read_text() == "hello"


def test_failed_optimizer_step_retracts_the_buffered_step(warm, monkeypatch):
    """The scores are buffered before optimizer.step(); if the step itself raises, they are withdrawn."""
    case, opt, attr, store = warm
    real = opt.step
    monkeypatch.setattr(opt, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        attr.step(*case.batches(1), None)
    monkeypatch.setattr(opt, "step", real)
    b, ids = case.batches(1)
    assert attr.step(b, ids, None).step == 1
    attr.close()
    log = shardshap.open_scores(str(store)).step_log
    assert sorted(log.step.values.tolist()) == [0, 1]


def _attributor(case, opt=None, **kw):
    opt = opt if opt is not None else torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    return shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, **kw)


API_CASES = [  # (build, error, message)
    (lambda c: _attributor(c, config={"estimator": "sgd"}), ConfigError, "config must be a shardshap.Config, got dict"),
    (lambda c: shardshap.Attributor(lambda x: x, None, c.train_loss, c.target_loss), AttributionError,
     "model must be a torch.nn.Module"),
    (lambda c: _attributor(c, opt=None) if False else shardshap.Attributor(c.model, None, c.train_loss,
                                                                          c.target_loss),
     ShardshapError, "pass the torch optimizer that trains the model"),
    (lambda c: shardshap.Attributor(c.model, torch.optim.AdamW(c.model.parameters()), c.train_loss, "loss"),
     AttributionError, "must be callables"),
    (lambda c: _attributor(c, opt=torch.optim.RMSprop(c.model.parameters())), UnsupportedOptimizer,
     "no update rule for optimizer torch.optim.rmsprop.RMSprop; supported: torch.optim.SGD"),
    (lambda c: _attributor(c, opt=torch.optim.SGD(c.model.parameters(), lr=0.1),
                           config=Config(estimator="adam-lagged")),
     UnsupportedOptimizer, "adam-lagged' needs torch.optim.Adam or AdamW.*use one of 'secant', 'sgd'"),
    (lambda c: _attributor(c, store="/tmp/x.zarr"), AttributionError, r"set Config\(num_samples=N\)"),
    (lambda c: _attributor(c, config=Config(exclude=["*"])), AttributionError,
     "no trainable parameter to attribute"),
]


@pytest.mark.parametrize("build, error, message", API_CASES, ids=[c[2][:30] for c in API_CASES])
def test_bad_attributor_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build(cases.digits_mlp(batch_size=6))


def test_low_level_misuse(warm):
    case, opt, attr, store = warm
    with pytest.raises(AttributionError, match=r"found no recorded micro-batch: wrap each micro-batch"):
        attr.attribute(None)
    attr.train_loss = None
    with pytest.raises(AttributionError, match="step\\(\\) needs train_loss.*low-level API"):
        attr.step(*case.batches(1), None)
    with pytest.raises(AttributionError, match="checkpoint of run 'other'.*pass run_id= or the same config"):
        attr.load_state_dict({"run_id": "other", "step": 3})
    assert attr.step_index == 1


CONFIG_CASES = [  # (fields, message naming the key and what is allowed)
    (dict(estimator="adam"), r"Config.estimator='adam' is not allowed; choose one of 'secant', 'adam-lagged'"),
    (dict(order=3), r"Config.order=3 is not allowed; choose one of 1, 2"),
    (dict(curvature="exact"), "Config.curvature='exact'.*'midpoint', 'hvp'"),
    (dict(reduction="median"), "Config.reduction='median'.*'mean', 'sum'"),
    (dict(compute_dtype="float16"), "Config.compute_dtype='float16'.*'auto', 'float32', 'float64'"),
    (dict(cold_start="warm"), "Config.cold_start='warm'.*'owen', 'none'"),
    (dict(target_sharding="sharded"), "Config.target_sharding='sharded'.*'replicated', 'split'"),
    (dict(cache_dtype="float16"), "Config.cache_dtype='float16'.*None, 'bfloat16'"),
    (dict(target_dtype="fp8"), "Config.target_dtype='fp8'"),
    (dict(product_rank=0), "Config.product_rank=0 must be a positive integer or None"),
    (dict(product_rank=True), "Config.product_rank=True must be a positive integer"),
    (dict(cold_steps=-1), "Config.cold_steps=-1 must be a non-negative integer"),
    (dict(max_grad_norm=0), "Config.max_grad_norm=0 must be a positive number or None"),
    (dict(max_grad_norm="1"), "Config.max_grad_norm='1' must be a positive number"),
    (dict(exclude="wpe.*"), "Config.exclude='wpe.\\*' must be a list of name patterns"),
    (dict(target_names=["a", "a"]), "has duplicates; names must be unique"),
    (dict(target_names="val"), "Config.target_names='val' must be a list of strings"),
    (dict(num_samples=0), "Config.num_samples=0 must be a positive integer or None"),
    (dict(compile_math="yes"), "Config.compile_math='yes' must be true or false"),
    (dict(check_completeness=1), "Config.check_completeness=1 must be true or false"),
    (dict(preset="fastest"), "Config.preset='fastest'.*'exact', 'fast', 'lowrank'"),
    (dict(preset="lowrank", product_rank=8), "preset='lowrank' sets product_rank=16, but product_rank=8 was given; "
                                            "drop the preset or the field"),
]


@pytest.mark.parametrize("fields, message", CONFIG_CASES, ids=[next(iter(c[0])) + "=" + repr(next(iter(c[0].values())))
                                                               for c in CONFIG_CASES])
def test_bad_config_names_the_key_and_the_choices(fields, message):
    with pytest.raises(ConfigError, match=message):
        Config(**fields)


def test_bad_config_mappings(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'mode' .*; valid keys: estimator"):
        Config.from_dict({"mode": "exact"})  # the removed knob is refused, not ignored
    with pytest.raises(ConfigError, match="must be a mapping of keys to values, got list"):
        Config.from_dict(["secant"])
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="c.yaml: no section 'shardshap'"):
        Config.from_file(p, section="shardshap")


TRAINER_CASES = [  # (override, what the message must name)
    ("model.d_model=30", "model.d_model=30 must be a multiple of model.n_head"),
    ("train.min_lr=1.0", "train.min_lr=1.0 is above train.lr"),
    ("attribution.num_samples=10", "attribution.num_samples is set by the trainer"),
    ("distributed.deepspeed=configs/missing.json", "distributed.deepspeed"),
    ("distributed.deepspeed={fp16: {enabled: true}}", "fp16"),
    ("train.resume=step_nowhere", "train.resume"),
]


@pytest.mark.parametrize("override, message", TRAINER_CASES, ids=[c[0].split("=")[0] for c in TRAINER_CASES])
def test_bad_trainer_config(override, message, monkeypatch, tmp_path):
    from pathlib import Path

    from shardshap.recipe.config import load_config
    root = Path(shardshap.__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    with pytest.raises(ConfigError) as err:
        cfg = load_config(root / "configs" / "demo_cpu.yaml", [override])
        if override.startswith("train.resume"):
            from shardshap.recipe.train import _find_checkpoint
            _find_checkpoint(cfg)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_time_major_module_is_refused_when_time_equals_batch():
    """A Linear fed [T, b, d] passes the shape checks when T == b but would give per-time-step values: the
    first step's probe (gradient of sample 0's loss alone) refuses it, before anything trains."""
    torch.manual_seed(0)

    class TimeMajor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):  # x [b, T, 4]
            return self.proj(x.transpose(0, 1)).transpose(0, 1)  # the Linear sees [T, b, 4]

    model = TimeMajor().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 5, 4, dtype=torch.float64)  # T == b == 5
    train_loss = lambda m, b: m(b).pow(2).mean((1, 2))
    target_loss = lambda m, t: m(x[:2]).pow(2).mean()
    before = [p.detach().clone() for p in model.parameters()]
    attr = shardshap.Attributor(model, opt, train_loss, target_loss, Config())
    with pytest.raises(BatchShapeError, match="'proj' mixes the samples.*batch as its first dimension"):
        attr.step(x, torch.arange(5), None)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    batch_first = torch.nn.Sequential(torch.nn.Linear(4, 4)).double()  # the same shapes, batch-first: accepted
    ok = shardshap.Attributor(batch_first, torch.optim.SGD(batch_first.parameters(), lr=0.1), train_loss,
                              lambda m, t: m(x[:2]).pow(2).mean(), Config())
    assert ok.step(x, torch.arange(5), None).scores.shape == (5, 1)
