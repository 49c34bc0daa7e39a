"""The low-level API (`attr.record(ids)` around the user's own forward/backward, `attr.attribute(targets)`
before the user's `optimizer.step()`): values against explicit per-sample gradients (torch.func), the
same game as `attr.step`, clipping by the user or by shardshap, and training unchanged."""
import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

import shardshap
from shardshap.testing import cases
from shardshap.testing.references import assert_same


def tokens_mean_loss(case, model, batch):
    """A Hugging-Face-style loss: mean over every real token of the batch (not a mean of per-sample means)."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(ids.shape[0], -1)
    return (tok * mask[:, 1:]).sum(), mask[:, 1:].sum()


def per_sample_contributions(model, batch, total_tokens):
    """Each sample's share of the gradient of tokens_mean_loss, by vmap over grad (the reference)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids, mask = batch

    def one(p, i, m):
        logits = functional_call(model, p, (i[None],), {"attention_mask": m[None]}).logits[0, :-1]
        tok = torch.nn.functional.cross_entropy(logits, i[1:], reduction="none")
        return (tok * m[1:]).sum() / total_tokens
    return vmap(grad(one), in_dims=(None, 0, 0))(params, ids, mask)


@pytest.mark.parametrize("who_clips,schedule", [("shardshap", "cached"), ("user", "cached"),
                                                ("shardshap", "streaming"), ("user", "streaming")])
def test_values_equal_per_sample_gradient_reference(who_clips, schedule):
    """estimator='sgd', order 1: value_i = clip * lr * <g_i, h(theta_t)> with g_i sample i's contribution to
    the accumulated gradient of the user's own loss (two micro-batches). W does not depend on the batch
    gradient here, so the streaming schedule (products in the backward, the second micro-batch's backward
    after its recording block) must give the same values."""
    case = cases.tiny_gpt2(batch_size=8)
    lr, max_norm = 0.05, 0.05
    opt = torch.optim.SGD(case.model.parameters(), lr=lr)
    cfg = shardshap.Config(estimator="sgd", order=1, max_grad_norm=max_norm, schedule=schedule)
    ref_model = copy.deepcopy(case.model)
    attr = shardshap.Attributor(case.model, opt, None, case.target_loss, cfg)
    (ids, mask), sample_ids = case.batches(0)
    micro = [(ids[:5], mask[:5]), (ids[5:], mask[5:])]
    total = mask[:, 1:].sum()
    opt.zero_grad()
    for j, (mb, mids) in enumerate(zip(micro, [sample_ids[:5], sample_ids[5:]])):
        with attr.record(mids, **({"targets": None} if j == 0 else {})):
            s, _ = tokens_mean_loss(case, case.model, mb)
            if j == 0:
                (s / total).backward()
        if j == 1:  # a backward after the block is still recorded
            (s / total).backward()
    norm = None
    if who_clips == "user":
        norm = torch.nn.utils.clip_grad_norm_(case.model.parameters(), max_norm)
    out = attr.attribute(grad_norm=norm) if schedule == "streaming" else attr.attribute(None, grad_norm=norm)
    assert out.metadata["schedule"] == schedule
    opt.step()

    per_micro = [per_sample_contributions(ref_model, mb, total) for mb in micro]
    g = {n: torch.cat([pm[n] for pm in per_micro]) for n, _ in ref_model.named_parameters()}
    total_norm = torch.sqrt(sum((gi.sum(0) ** 2).sum() for gi in g.values()))
    clip = min(1.0, max_norm / (float(total_norm) + 1e-6))
    assert clip < 0.5, "the case must clip"
    h0 = torch.autograd.grad(case.target_loss(ref_model, None)[0], list(ref_model.parameters()))
    expected = clip * lr * sum((gi.flatten(1) * hk.flatten()).sum(1) for gi, hk in zip(g.values(), h0))
    torch.testing.assert_close(out.scores[:, 0], expected, rtol=1e-9, atol=1e-15)
    assert out.clip_factor == pytest.approx(clip, rel=1e-9)
    assert torch.isnan(out.sample_loss).all(), "no per-sample loss was recorded"


def test_same_game_as_step_and_training_unchanged():
    """With the loss that step() itself uses (mean of per-sample losses) the low-level API plays the same game:
    same values; and the parameters after the user's optimizer.step() equal a plain loop's."""
    case = cases.tiny_llama(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = shardshap.Config(max_grad_norm=0.5)
    plain_m, plain_o = copy.deepcopy((case.model, opt))
    step_m, step_o = copy.deepcopy((case.model, opt))
    low = shardshap.Attributor(case.model, opt, None, case.target_loss, cfg)
    via_step = shardshap.Attributor(step_m, step_o, case.train_loss, case.target_loss, cfg)
    for s in range(3):
        batch, sample_ids = case.batches(s)
        opt.zero_grad()
        with low.record(sample_ids) as rec:
            per_sample = case.train_loss(case.model, batch)
            per_sample.mean().backward()
            rec.sample_loss = per_sample.detach()
        out = low.attribute(None)
        opt.step()
        ref = via_step.step(batch, sample_ids, None)
        torch.testing.assert_close(out.scores, ref.scores, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(out.sample_loss, ref.sample_loss)

        plain_o.zero_grad()
        case.train_loss(plain_m, batch).mean().backward()
        torch.nn.utils.clip_grad_norm_(plain_m.parameters(), 0.5)
        plain_o.step()
    assert_same(case.model, opt, plain_m, plain_o)


def test_errors_leave_nothing_half_applied():
    case = cases.digits_mlp(batch_size=8)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    attr = shardshap.Attributor(case.model, opt, None, case.target_loss, shardshap.Config())
    with pytest.raises(shardshap.AttributionError, match="no recorded micro-batch"):
        attr.attribute(None)
    with pytest.raises(shardshap.AttributionError, match="step\\(\\) needs train_loss"):
        attr.step(*case.batches(0), None)
    batch, ids = case.batches(0)
    with attr.record(ids):
        case.train_loss(case.model, batch).mean().backward()
    before = [p.detach().clone() for p in case.model.parameters()]
    good = attr.target_loss
    attr.target_loss = lambda m, t: good(m, t) * float("nan")
    with pytest.raises(shardshap.AttributionError, match="target_loss is not finite"):
        attr.attribute(None)
    attr.target_loss = good
    opt.step()  # the gradients were dropped: the user's step changes nothing
    for p, q in zip(case.model.parameters(), before):
        assert torch.equal(p, q)
    # the next step starts clean: no leftover micro-batches
    with attr.record(ids):
        case.train_loss(case.model, batch).mean().backward()
    assert attr.attribute(None).scores.shape == (8, 2)



def test_a_failed_micro_batch_leaves_no_recording_behind(tmp_path):
    """Bad ids in the second micro-batch fail the step before anything moves, and the next step holds only
    its own samples (no stale micro-batch from the failed one)."""
    case = cases.digits_mlp(batch_size=8)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(num_samples=1797), store=str(tmp_path / "s.zarr"))
    (x, y), ids = case.batches(0)
    before = [p.detach().clone() for p in case.model.parameters()]
    with pytest.raises(shardshap.AttributionError, match="duplicates"):
        attr.step([(x[:4], y[:4]), (x[4:], y[4:])], [ids[:4], ids[:4]], None)
    assert all(torch.equal(p, q) for p, q in zip(case.model.parameters(), before))
    out = attr.step(*case.batches(1), None)
    assert out.scores.shape == (8, 2) and torch.equal(out.sample_ids, case.batches(1)[1])
    attr.close()
