"""The accelerator path (shardshap.foreach.BATCH_KERNELS: foreach secant and dots, same-shaped layers stacked
under vmap) gives the values of the per-parameter path a CPU takes, float64, in every schedule."""
import copy

import pytest
import torch

import shardshap
from shardshap import foreach
from shardshap.testing import cases


@pytest.mark.parametrize("config", [dict(), dict(schedule="streaming"), dict(order=1, max_grad_norm=None),
                                    dict(schedule="streaming", stream_predictor="momentum"), dict(product_rank=4)],
                         ids=["cached", "streaming", "order1-noclip", "streaming-momentum", "low-rank"])
def test_batched_kernels_give_the_per_parameter_values(config, monkeypatch):
    case = cases.tiny_gpt2(batch_size=6, n_targets=2)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(3):  # past Owen's cold steps, so that the secant runs
        opt.zero_grad()
        case.train_loss(case.model, case.batches(s)[0]).mean().backward()
        opt.step()
    cfg = shardshap.Config(**{"max_grad_norm": 0.05, **config})
    runs = {}
    for at_once in (True, False):
        monkeypatch.setattr(foreach, "BATCH_KERNELS", at_once)
        model, o = copy.deepcopy((case.model, opt))
        with shardshap.Attributor(model, o, case.train_loss, case.target_loss, cfg) as attr:
            outs = [attr.step(*case.batches(s), None) for s in (3, 4)]  # (streaming: the second step sketches)
        runs[at_once] = (outs, [p.detach().clone() for p in model.parameters()])
    (batched, params_b), (alone, params_a) = runs[True], runs[False]
    for b, a in zip(batched, alone):
        scale = a.scores.abs().max()
        assert scale > 0
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-10 * float(scale))
        assert b.clip_factor == a.clip_factor
    for pb, pa in zip(params_b, params_a):
        assert torch.equal(pb, pa), "training must not depend on how attribution batches its kernels"


@pytest.mark.parametrize("large", [False, True], ids=["small-captures", "large-captures"])
def test_bf16_cache_is_cast_with_the_stack_and_when_the_next_micro_batch_starts(large, monkeypatch):
    """cache_dtype='bfloat16' where layers are stacked: small captures are kept as they come and cast with their
    stack (one kernel per group, not one per capture), or when the next micro-batch starts recording (they are
    held across its forward and backward); large ones (more than CAST_LATER_NUMBERS numbers) are cast in the
    hook, as on the per-parameter path. The products take bf16 either way and give the per-parameter values."""
    from shardshap.ghost import capture
    from shardshap.ghost.linear import LinearRule
    if large:
        monkeypatch.setattr(capture, "CAST_LATER_NUMBERS", 0)
    case = cases.tiny_gpt2(batch_size=6, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    (ids, mask), sample_ids = case.batches(0)
    micro = [(ids[:3], mask[:3]), (ids[3:], mask[3:])], [sample_ids[:3], sample_ids[3:]]
    taken, kept = [], []
    products = LinearRule.products
    monkeypatch.setattr(LinearRule, "products", lambda self, module, a, e, W: (
        taken.append((a.dtype, e.dtype)), products(self, module, a, e, W))[1])
    cast_kept = capture.Capture._cast_kept

    def dtypes(cap):
        return {x.dtype for am in cap.plan.modules if cap._low_dtype(am) is not None
                for call in cap.calls[am.name] for x in (call.a, call.e)}

    def watched(self):  # micro-batch 0's captures as micro-batch 1 starts: before and after the cast
        before = dtypes(self)
        cast_kept(self)
        kept.append((before, dtypes(self)))
    monkeypatch.setattr(capture.Capture, "_cast_kept", watched)
    scores = {}
    for at_once in (True, False):
        monkeypatch.setattr(foreach, "BATCH_KERNELS", at_once)
        taken.clear(), kept.clear()
        model, o = copy.deepcopy((case.model, opt))
        with shardshap.Attributor(model, o, case.train_loss, case.target_loss,
                                  shardshap.Config(cache_dtype="bfloat16")) as attr:
            scores[at_once] = attr.step(*micro, None).scores
        assert taken and set(taken) == {(torch.bfloat16, torch.bfloat16)}
        late = at_once and not large
        assert kept == [({torch.float32} if late else {torch.bfloat16}, {torch.bfloat16})]
    assert torch.corrcoef(torch.stack([scores[True].flatten(), scores[False].flatten()]))[0, 1] > 0.9999
