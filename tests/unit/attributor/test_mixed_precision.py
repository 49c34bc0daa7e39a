"""bf16 autocast: the completeness check knows the precision the gradients were computed in (it no longer
refuses correct bf16 products), the values follow the float32 ones, and training is unchanged."""
import copy

import torch

import shardshap
from shardshap.testing import cases
from shardshap.testing.references import assert_same


def test_bf16_autocast_values_follow_float32_and_training_is_unchanged():
    case = cases.tiny_llama(batch_size=8, dtype=torch.float32)
    config = shardshap.Config(max_grad_norm=1.0)

    def autocast_loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return case.train_loss(m, b).float()

    runs = {}
    for name, loss in [("fp32", case.train_loss), ("bf16", autocast_loss)]:
        model = copy.deepcopy(case.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        attr = shardshap.Attributor(model, opt, loss, case.target_loss, config)
        # one step from the same state (the float32 run's), so that the two games are the same
        batch, ids = case.batches(0)
        runs[name] = attr.step(batch, ids, None).scores
    for k in range(2):
        R = torch.corrcoef(torch.stack([runs["fp32"][:, k], runs["bf16"][:, k]]))[0, 1]
        assert R > 0.99, R

    model, plain = copy.deepcopy(case.model), copy.deepcopy(case.model)
    opt, plain_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, plain))
    attr = shardshap.Attributor(model, opt, autocast_loss, case.target_loss, config)
    for step in range(3):
        batch, ids = case.batches(step)
        attr.step(batch, ids, None)
        plain_opt.zero_grad()
        autocast_loss(plain, batch).mean().backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
    assert_same(model, opt, plain, plain_opt)
