"""Per-document values in packed sequences (per-position sample_ids), against explicit per-document
gradients and against the exact Shapley values of the game whose players are the documents."""
import copy

import pytest
import torch

import shardshap
from shardshap.oracle import shapley
from shardshap.testing import cases
from shardshap.testing.references import assert_same
from shardshap.verify import compare_estimators

LR = 0.05


def counted_sum(losses, ids):
    return torch.where(ids >= 0, losses, torch.zeros_like(losses)).sum()


def document_losses(case, model, batch, ids):
    """[documents] sum of each document's counted position losses (documents in increasing id order)."""
    losses = case.train_loss(model, batch)
    docs = torch.unique(ids[ids >= 0])
    return torch.stack([losses[ids == d].sum() for d in docs]), docs


def explicit_values(case, model, micro, micro_ids, lr):
    """lr <g_D, grad L_target_k> with g_D the gradient of (document D's position losses / counted positions of
    the step), one autograd.grad per document over every micro-batch it is in: [documents, K], ids."""
    params = list(model.parameters())
    n = sum(int((i >= 0).sum()) for i in micro_ids)
    docs = torch.unique(torch.cat([i[i >= 0] for i in micro_ids]))
    K = len(case.target_loss(model, None))
    h = [torch.autograd.grad(case.target_loss(model, None)[k], params, allow_unused=True) for k in range(K)]
    rows = []
    for d in docs:
        loss = sum(case.train_loss(model, mb)[ids == d].sum() for mb, ids in zip(micro, micro_ids)) / n
        g = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.stack([lr * sum((gi * hi).sum() for gi, hi in zip(g, hk) if gi is not None
                                           and hi is not None) for hk in h]))
    return torch.stack(rows), docs


def plain_packed_step(case, model, opt, micro, micro_ids):
    """The step attr.step replaces for per-position ids: the mean over the step's counted positions."""
    opt.zero_grad()
    n = sum(int((i >= 0).sum()) for i in micro_ids)
    for mb, ids in zip(micro, micro_ids):
        (counted_sum(case.train_loss(model, mb), ids) * (1.0 / n)).backward()
    opt.step()


def two_micro_batches(case, step=0):
    batch, pid = case.batches(step)
    rows = (slice(0, 2), slice(2, None))
    return [tuple(None if x is None else x[r] for x in batch) for r in rows], [pid[r] for r in rows]


CONFIGS = {
    "cached": dict(),
    "streaming subspace": dict(schedule="streaming", sketch_rank=64),  # full bases: exact
    "streaming momentum": dict(schedule="streaming", stream_predictor="momentum"),
}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_document_values_equal_explicit_per_document_gradients(family, config):
    """Documents cut across rows and across micro-batches: each value is the sum of its positions' parts,
    and training equals the plain step on the mean over counted positions."""
    case = cases.packed_lm(family)
    micro, micro_ids = two_micro_batches(case)
    spans = [set(i[i >= 0].tolist()) for i in micro_ids]
    assert spans[0] & spans[1], "a document must be split across the micro-batches"
    ref_model = copy.deepcopy(case.model)
    expected, docs = explicit_values(case, ref_model, micro, micro_ids, LR)
    opt = torch.optim.SGD(case.model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
    cfg = shardshap.Config(estimator="sgd", order=1, **CONFIGS[config])
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, cfg) as attr:
        for _ in range(2):  # (streaming: the first step fixes the bases, the second uses them)
            out = attr.step(micro, micro_ids, None)
            torch.testing.assert_close(out.sample_ids.sort().values, docs)
            order = out.sample_ids.argsort()
            torch.testing.assert_close(out.scores[order], expected, rtol=1e-8, atol=1e-14)
            flat = torch.cat([case.train_loss(ref_model, mb).detach().reshape(-1) for mb in micro])
            flat_ids = torch.cat([i.reshape(-1) for i in micro_ids])
            assert float(out.loss) == pytest.approx(float(flat[flat_ids >= 0].mean()), rel=1e-12)
            per_doc = torch.stack([flat[flat_ids == d].mean() for d in docs])
            torch.testing.assert_close(out.sample_loss[order], per_doc, rtol=1e-12, atol=0)
            plain_packed_step(case, ref_model, ref_opt, micro, micro_ids)
            assert_same(case.model, opt, ref_model, ref_opt)
            expected, _ = explicit_values(case, ref_model, micro, micro_ids, LR)


def test_document_values_sum_even_with_attention_across_documents():
    """Plain causal attention over the packed row: the split by document is an approximation (a token's
    output gradient also comes from later documents' losses), but the values still add up to the step's."""
    case = cases.packed_lm("gpt2", document_masked=False)
    micro, micro_ids = two_micro_batches(case)
    ref_model = copy.deepcopy(case.model)
    per_doc, _ = explicit_values(case, ref_model, micro, micro_ids, LR)
    opt = torch.optim.SGD(case.model.parameters(), lr=LR)
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                              shardshap.Config(estimator="sgd", order=1)) as attr:
        out = attr.step(micro, micro_ids, None)
    order = out.sample_ids.argsort()
    torch.testing.assert_close(out.scores.sum(0), per_doc.sum(0), rtol=1e-9, atol=1e-15)
    assert not torch.allclose(out.scores[order], per_doc, rtol=1e-3), "across documents the split is not exact"


def warm(case, opt, steps):
    for s in range(steps):
        (batch, ids) = case.batches(s)
        plain_packed_step(case, case.model, opt, [batch], [ids])


@pytest.mark.parametrize("step", [0, 10])
def test_secant_on_documents_against_the_oracle(step):
    """The secant's values on a packed batch against the exact Shapley values of the true one-step AdamW game
    whose players are the documents (cold step 0 takes Owen's start)."""
    case = cases.packed_lm("gpt2", rows=3)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warm(case, opt, step)
    batch, ids = case.batches(step)
    n = int((ids >= 0).sum())

    def players_loss(model, b):  # one loss per document: the game of sum over coalitions / counted positions
        return document_losses(case, model, b, ids)[0] / n

    oracle = shapley(case.model, opt, players_loss, case.target_loss, batch, None, reduction="sum")
    _, (r, plain) = compare_estimators(
        case.model, opt, case.train_loss, case.target_loss, batch, ids, None, oracle=oracle,
        variants=[dict(estimator="secant", order=2), dict(estimator="secant", order=2, cold_start="none")])
    print(f"\npacked gpt2, {len(oracle.shapley)} documents, AdamW step {step + 1}: R = {r.pearson}, "
          f"efficiency gap = {r.efficiency_gap}")
    if step == 0:  # a cold step: Owen's start keeps the secant's sum (as for samples: test_fidelity.py)
        assert min(r.pearson) >= 0.94, r.pearson
        assert r.efficiency_gap == pytest.approx(plain.efficiency_gap, abs=1e-9)
    else:
        assert min(r.pearson) >= 0.999, r.pearson
        assert max(r.efficiency_gap) <= 0.01, r.efficiency_gap


def test_low_level_api_plays_the_same_game():
    case = cases.packed_lm("gpt2")
    micro, micro_ids = two_micro_batches(case)
    m2, cfg = copy.deepcopy(case.model), shardshap.Config(estimator="sgd", order=1)
    opt, opt2 = (torch.optim.SGD(m.parameters(), lr=LR) for m in (case.model, m2))
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, cfg) as attr:
        ref = attr.step(micro, micro_ids, None)
    n = sum(int((i >= 0).sum()) for i in micro_ids)
    with shardshap.Attributor(m2, opt2, None, case.target_loss, cfg) as attr:
        opt2.zero_grad()
        for mb, ids in zip(micro, micro_ids):
            with attr.record(ids) as rec:
                losses = case.train_loss(m2, mb)
                (counted_sum(losses, ids) / n).backward()
                rec.sample_loss = losses
        out = attr.attribute(None)
        opt2.step()
    torch.testing.assert_close(out.sample_ids, ref.sample_ids)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(out.sample_loss, ref.sample_loss)


def test_store_keeps_one_slot_per_document(tmp_path):
    case = cases.packed_lm("gpt2")
    opt = torch.optim.SGD(case.model.parameters(), lr=LR)
    store = str(tmp_path / "docs.zarr")
    docs_seen = {}
    cfg = shardshap.Config(estimator="sgd", order=1, num_samples=200, store_slots=10)
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, cfg, store=store) as attr:
        for s in range(3):
            micro, micro_ids = two_micro_batches(case, s)
            out = attr.step(micro, micro_ids, None)
            for d, v in zip(out.sample_ids.tolist(), out.scores.sum(1).tolist()):
                docs_seen[d] = docs_seen.get(d, 0.0) + v
        before = copy.deepcopy(case.model.state_dict())
        micro, micro_ids = two_micro_batches(case, 3)
        wide = [torch.arange(22).view(2, 11), torch.arange(22, 44).view(2, 11)]  # 44 documents: too many
        with pytest.raises(shardshap.StoreError, match="44 players .* 10 slots per rank .Config.store_slots"):
            attr.step(micro, wide, None)
        for k, v in case.model.state_dict().items():
            assert torch.equal(v, before[k]), "a refused step must not train"
    scores = shardshap.open_scores(store)
    assert scores.num_steps == 3
    ids = sorted(docs_seen)
    torch.testing.assert_close(torch.as_tensor(scores.value.sum(1)[ids]).double(),
                               torch.tensor([docs_seen[i] for i in ids]).double(), rtol=1e-5, atol=1e-9)
    assert (scores.count[ids] >= 1).all() and scores.count.sum() == sum(
        len(torch.unique(torch.cat([i[i >= 0] for i in two_micro_batches(case, s)[1]]))) for s in range(3))


def test_per_position_errors():
    case = cases.packed_lm("gpt2")
    (batch, ids) = case.batches(0)
    opt = torch.optim.SGD(case.model.parameters(), lr=LR)
    attr = shardshap.Attributor(case.model, opt, lambda m, b: case.train_loss(m, b).mean(1), case.target_loss,
                                shardshap.Config(estimator="sgd", order=1))
    with pytest.raises(shardshap.AttributionError, match="per-position sample_ids have shape"):
        attr.step(batch, ids, None)
    attr.train_loss = case.train_loss
    with pytest.raises(shardshap.AttributionError, match="no position counts"):
        attr.step(batch, torch.full_like(ids, -1), None)
    with pytest.raises(shardshap.AttributionError, match="ids >= 0, or -1"):
        attr.step(batch, ids - 5, None)
    attr.close()

    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3, padding=1))
    attr = shardshap.Attributor(conv, torch.optim.SGD(conv.parameters(), lr=0.1),
                                lambda m, x: m(x).pow(2).mean(1), lambda m, t: m(t).pow(2).mean(),
                                shardshap.Config(estimator="sgd", order=1))
    with pytest.raises(shardshap.UnsupportedModule, match="not a sum over tokens"):
        attr.step(torch.randn(2, 3, 5), torch.zeros(2, 5, dtype=torch.int64), torch.randn(1, 3, 5))
