"""LoRA through PEFT (the docs/training.md recipe): only the adapter parameters are attributed, their values
equal explicit per-sample gradients (torch.func), and training is unchanged."""
import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

import shardshap
from shardshap.testing import cases
from shardshap.testing.references import assert_same, plain_step

peft = pytest.importorskip("peft")


def lora_case(dropout=0.0):
    case = cases.tiny_llama(batch_size=8)
    # init_lora_weights=False: B is random instead of zero, so both adapter matrices get gradients
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout,
                             init_lora_weights=False)
    torch.manual_seed(0)
    case.model = peft.get_peft_model(case.model, config)
    return case


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_lora_values_equal_per_sample_gradients():
    """estimator='sgd', order 1: value_i = lr * <grad l_i / b, grad L_target_k> over the adapter parameters."""
    case = lora_case()
    model, lr = case.model, 0.05
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable(model).values(), lr=lr)
    attr = shardshap.Attributor(model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(estimator="sgd", order=1))
    assert attr.plan.params and all("lora_" in n for n in attr.plan.params), "only the adapters are attributed"
    batch, ids = case.batches(0)
    out = attr.step(batch, ids, case.targets)

    params = trainable(reference)
    frozen = {n: p.detach() for n, p in reference.named_parameters() if not p.requires_grad}

    def one(p, i, m):
        return case.train_loss(lambda **kw: functional_call(reference, {**frozen, **p}, (), kw),
                               (i[None], m[None]))[0] / len(ids)
    ids_, mask = batch
    per_sample = vmap(grad(one), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, ids_, mask)
    targets = case.target_loss(reference, case.targets)
    for k in range(targets.numel()):
        h = torch.autograd.grad(targets[k], list(params.values()), retain_graph=True)
        expected = lr * sum((per_sample[n].flatten(1) * hk.flatten()).sum(1) for n, hk in zip(params, h))
        torch.testing.assert_close(out.scores[:, k], expected, rtol=1e-9, atol=1e-15)


def test_lora_training_unchanged_with_dropout():
    """AdamW with clipping and lora_dropout 0.1 (eval-mode targets, the default): parameters and optimizer
    state equal plain training's bit for bit (the dropout masks drawn in the same order)."""
    case = lora_case(dropout=0.1)
    plain_model = copy.deepcopy(case.model)
    opt = torch.optim.AdamW(trainable(case.model).values(), lr=1e-3)
    plain_opt = torch.optim.AdamW(trainable(plain_model).values(), lr=1e-3)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(max_grad_norm=1.0))
    case.model.train()
    plain_model.train()
    for step in range(3):
        batch, ids = case.batches(step)
        torch.manual_seed(step)
        attr.step(batch, ids, case.targets)
        torch.manual_seed(step)
        plain_step(plain_model, plain_opt, case.train_loss, [batch], 1.0)
    assert_same(case.model, opt, plain_model, plain_opt)
