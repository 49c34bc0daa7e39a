"""The streaming schedule and activation checkpointing: captures taken once whatever the checkpointing,
values unchanged by it, training unchanged, and streaming's fidelity against the cached (exact) schedule."""
import copy

import pytest
import torch

import shardshap
from shardshap.config import STREAM_PREDICTORS
from shardshap.ghost.capture import Capture
from shardshap.testing import cases
from shardshap.testing.references import assert_same


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def run(case, config, steps, micro=2, checkpointing=None, lr=1e-3):
    """(values per step, model, optimizer) of `steps` AdamW steps of `micro` micro-batches each."""
    model = copy.deepcopy(case.model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    values = []
    with shardshap.Attributor(model, opt, case.train_loss, case.target_loss, config) as attr:
        for t in range(steps):
            mbs = [case.batches(t * micro + j) for j in range(micro)]
            out = attr.step([b for b, _ in mbs], [i for _, i in mbs], case.targets)
            values.append(out)
    return values, model, opt


def plain(case, steps, micro=2, checkpointing=None, lr=1e-3, max_norm=1.0):
    model = copy.deepcopy(case.model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for t in range(steps):
        mbs = [case.batches(t * micro + j) for j in range(micro)]
        n = sum(len(i) for _, i in mbs)
        opt.zero_grad()
        for b, _ in mbs:
            (case.train_loss(model, b).sum() / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return model, opt


@pytest.mark.parametrize("schedule", ["cached", "streaming"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_captures_once_and_changes_nothing(schedule, reentrant, monkeypatch):
    """Under both kinds of activation checkpointing every module call is captured exactly once (not again
    in the recomputation), the values equal those without checkpointing, the target pass runs (a reentrant
    checkpoint refuses autograd.grad) and training equals plain training with the same checkpointing."""
    case = cases.tiny_gpt2(batch_size=4)
    config = shardshap.Config(schedule=schedule, max_grad_norm=1.0, cold_start="none")
    arrivals = []
    original = Capture._arrived
    def counted(self, am, *rest):
        if not self._muted:  # (the first step's batch-first probe captures nothing)
            arrivals.append(am.name)
        return original(self, am, *rest)
    monkeypatch.setattr(Capture, "_arrived", counted)
    reference, _, _ = run(case, config, steps=2)
    per_step = len(arrivals) // 2
    arrivals.clear()
    checkpointed, model, opt = run(case, config, steps=2, checkpointing=reentrant)
    assert len(arrivals) == 2 * per_step, "each module call is captured once per micro-batch"
    for a, b in zip(reference, checkpointed):
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-9, atol=1e-14)
        assert b.metadata["schedule"] == schedule
    plain_model, plain_opt = plain(case, steps=2, checkpointing=reentrant)
    assert_same(model, opt, plain_model, plain_opt)


def test_streaming_training_unchanged_with_every_predictor():
    case = cases.tiny_llama(batch_size=4)
    plain_model, plain_opt = plain(case, steps=3)
    for predictor in STREAM_PREDICTORS:
        config = shardshap.Config(schedule="streaming", stream_predictor=predictor, max_grad_norm=1.0)
        _, model, opt = run(case, config, steps=3)
        assert_same(model, opt, plain_model, plain_opt)


@pytest.mark.parametrize("make", [cases.tiny_gpt2, cases.tiny_llama], ids=["gpt2", "llama"])
def test_streaming_fidelity_against_cached(make):
    """On warm steps the default 'subspace' sketches stay close to the exact (cached) values at lr 1e-3 (the
    issue's bar: R >= 0.99 on every step, median >= 0.999; the other predictors: benchmarks/streaming_fidelity.py
    and docs/method.md, "Schedules")."""
    case = make(batch_size=8)
    steps = 22
    cached, _, _ = run(case, shardshap.Config(max_grad_norm=1.0, cold_start="none"), steps)
    streamed, _, _ = run(case, shardshap.Config(schedule="streaming", max_grad_norm=1.0), steps)
    R = torch.tensor([min(pearson(a.scores[:, k], b.scores[:, k]) for k in range(a.scores.shape[1]))
                      for a, b in zip(cached[10:], streamed[10:])])
    assert R.min() > 0.99 and R.median() > 0.999, R


def test_subspace_sketches_equal_products_with_the_projected_W():
    """The sketches are exact products with U U^T W V V^T: with bases that span everything (rank as large as
    the layers) the streamed values equal the cached ones, and the metadata says the whole W was kept."""
    case = cases.tiny_gpt2(batch_size=4)
    cached, _, _ = run(case, shardshap.Config(max_grad_norm=1.0, cold_start="none"), steps=3)
    full, _, _ = run(case, shardshap.Config(schedule="streaming", sketch_rank=64, max_grad_norm=1.0), steps=3)
    for a, b in zip(cached, full):
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-9, atol=1e-14)
        assert min(b.metadata["sketch_energy"].values()) > 1 - 1e-9 and not b.metadata["cold_start"]
    with pytest.warns(UserWarning, match="raise Config.sketch_rank") as caught:
        small, _, _ = run(case, shardshap.Config(schedule="streaming", sketch_rank=1, max_grad_norm=1.0,
                                                 cold_steps=0), steps=3)  # (no warning on cold steps)
    assert sum("sketch_rank" in str(w.message) for w in caught) == 1, "warned once"
    assert min(small[-1].metadata["sketch_energy"].values()) < 0.8
    for a, b in zip(cached, small):  # what the subspace misses is shared equally: the sums are cached's
        torch.testing.assert_close(b.scores.sum(0), a.scores.sum(0), rtol=1e-9, atol=1e-15)
        assert not torch.allclose(b.scores, a.scores, rtol=1e-3), "rank 1 keeps too little for exact values"


def test_streaming_with_owen_cold_start_runs_the_cold_steps_cached():
    case = cases.digits_mlp(batch_size=8)
    config = shardshap.Config(schedule="streaming", cold_start="owen", cold_steps=2)
    values, _, _ = run(case, config, steps=4)
    assert [v.metadata["schedule"] for v in values] == ["cached", "cached", "streaming", "streaming"]
    assert [v.metadata["cold_start"] for v in values] == [True, True, False, False]
    assert shardshap.Config(schedule="streaming").cold_start == "none"
    assert shardshap.Config().cold_start == "owen"


@pytest.mark.parametrize("fields", [{"product_rank": 4}, {"preset": "fast"}], ids=["rank4", "fast"])
def test_streaming_low_rank_and_bf16_stay_close_to_exact_streaming(fields):
    """Low rank keeps only each matrix layer's factors (rank 4 of 32 x 96 layers here), bf16 casts the
    captures as they arrive; both are approximations of the exact streamed products."""
    case = cases.tiny_gpt2(batch_size=8, n_embd=32, dtype=torch.float32)
    config = dict(schedule="streaming", stream_predictor="momentum", max_grad_norm=1.0)
    exact, _, _ = run(case, shardshap.Config(**config), steps=3)
    approx, _, _ = run(case, shardshap.Config(**config, **fields), steps=3)
    for a, b in zip(exact, approx):
        assert pearson(a.scores[:, 0], b.scores[:, 0]) > 0.99
    if "product_rank" in fields:
        assert any(v.metadata["product_layer_rank"] for v in approx), "some layers must be factorised"


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("at_once", [False, True], ids=["per-parameter", "batched"])
def test_fast_sketches_stay_close_to_exact_sketches(at_once, autocast, monkeypatch):
    """preset='fast' under the subspace predictor. Sketches take the output gradient's dtype: under bf16
    autocast bf16 captures against bases cast once (per group on the batched path) track the float32
    sketches; in fp32 training nothing is cast, and on the batched path (whose target pass runs as the model
    does, target_dtype='auto') the values are the exact ones."""
    import dataclasses

    from shardshap import foreach
    monkeypatch.setattr(foreach, "BATCH_KERNELS", at_once)
    case = cases.tiny_gpt2(batch_size=8, n_embd=32, dtype=torch.float32)
    if autocast:
        case = dataclasses.replace(case, train_loss=torch.autocast("cpu", torch.bfloat16)(case.train_loss))
    config = dict(schedule="streaming", max_grad_norm=1.0, cold_steps=0)
    exact, _, _ = run(case, shardshap.Config(**config), steps=3)
    approx, _, _ = run(case, shardshap.Config(**config, preset="fast"), steps=3)
    assert [v.metadata.get("sketch_energy") is not None for v in approx][1:] == [True, True]
    for a, b in zip(exact[1:], approx[1:]):
        assert pearson(a.scores[:, 0], b.scores[:, 0]) > 0.99
        if at_once and not autocast:
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6 * float(a.scores.abs().max()))


def test_low_level_streaming_needs_the_targets_first():
    case = cases.digits_mlp(batch_size=8)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-3)
    attr = shardshap.Attributor(case.model, opt, None, case.target_loss, shardshap.Config(schedule="streaming"))
    batch, ids = case.batches(0)
    with pytest.raises(shardshap.AttributionError, match="pass the targets to the first record"):
        with attr.record(ids):
            pass
    targets = {"v": 1}
    with attr.record(ids, targets=targets):
        case.train_loss(case.model, batch).mean().backward()
    with pytest.raises(shardshap.AttributionError, match="without targets"):
        attr.attribute({"v": 2})
    opt.step()  # the refused step dropped the gradients: this changes nothing
    with attr.record(ids, targets=targets):
        case.train_loss(case.model, batch).mean().backward()
    out = attr.attribute()
    assert out.scores.shape == (8, 2) and out.metadata["schedule"] == "streaming"
