"""Attribution never changes training: after attr.step, parameters and optimizer state equal those of the
plain step on the same batch, for every estimator and order, with gradient accumulation, clipping and
dropout (the target pass must not consume training's random numbers)."""
import copy

import pytest
import torch

import shardshap
from shardshap.estimators import ESTIMATORS
from shardshap.testing import cases
from shardshap.testing.references import assert_same, assert_training_unchanged, plain_step


def split(batch, ids, parts):
    if parts == 1:
        return batch, ids, [batch]
    xs = [tuple(t.chunk(parts)[j] for t in batch) for j in range(parts)]  # a list: micro-batches
    return xs, list(ids.chunk(parts)), xs


VARIANTS = [dict(estimator=e, order=o) for e in ESTIMATORS for o in (1, 2)] + [
    dict(estimator="secant", order=2, curvature="hvp")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("parts", [1, 2])
def test_mlp_adamw_clip(variant, parts):
    case = cases.digits_mlp(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=parts == 2)
    ref_model, ref_opt = copy.deepcopy((case.model, opt))
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(max_grad_norm=0.5, **variant))
    for s in range(3):
        b, ids = case.batches(s)
        mb, mids, micro = split(b, ids, parts)
        out = attr.step(mb, mids, None)
        assert out.scores.shape == (8, 2) and torch.equal(out.sample_ids, ids)
        plain_step(ref_model, ref_opt, case.train_loss, micro, 0.5)
    assert_same(case.model, opt, ref_model, ref_opt)


@pytest.mark.parametrize("optimizer", ["sgd-nesterov", "adam-l2"])
def test_gpt2_with_dropout(optimizer):
    case = cases.tiny_gpt2(batch_size=4, dtype=torch.float32, dropout=0.1)
    case.model.train()
    if optimizer == "sgd-nesterov":
        opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(case.model.parameters(), lr=1e-3, weight_decay=1e-2)
    assert_training_unchanged(case, opt)


def test_bf16_model_values_reduced_in_fp32():
    """A bf16 model trains exactly as without attribution, and its values (reduced in fp32) agree with
    those of the same model and optimizer state in fp32."""
    from shardshap.verify import pearson
    case = cases.tiny_gpt2(batch_size=8, dtype=torch.float32)
    case.model = case.model.to(torch.bfloat16)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3)
    ref_model, ref_opt = copy.deepcopy((case.model, opt))
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss)
    for s in range(3):
        b, ids = case.batches(s)
        out = attr.step(b, ids, None)
        plain_step(ref_model, ref_opt, case.train_loss, [b], None)
    assert out.scores.dtype == torch.float32
    assert_same(case.model, opt, ref_model, ref_opt)
    m32 = copy.deepcopy(case.model).float()
    o32 = torch.optim.AdamW(m32.parameters(), lr=3e-3)
    o32.load_state_dict(opt.state_dict())
    b, ids = case.batches(3)
    v16 = attr.step(b, ids, None).scores
    v32 = shardshap.Attributor(m32, o32, case.train_loss, case.target_loss).step(b, ids, None).scores
    assert min(pearson(v16[:, k], v32[:, k]) for k in range(2)) > 0.999
