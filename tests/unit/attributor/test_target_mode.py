"""Config.target_mode: the target losses are taken in eval mode by default (dropout off: a fixed function of
the parameters) and each submodule's own mode is restored. Training unchanged with dropout and the eval-mode
target pass: tests/unit/attributor/test_training_unchanged.py::test_gpt2_with_dropout."""
import copy

import torch

import shardshap
from shardshap.testing import cases


def test_eval_target_pass_is_deterministic_and_modes_are_restored():
    case = cases.tiny_gpt2(batch_size=4, dropout=0.3)
    model = case.model.train()
    model.transformer.h[0].eval()  # a part the user keeps in eval mode on purpose
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    modes = {n: m.training for n, m in model.named_modules()}
    losses = {}
    for mode in ("eval", "train"):
        m, o = copy.deepcopy((model, opt))
        with shardshap.Attributor(m, o, case.train_loss, case.target_loss,
                                  shardshap.Config(target_mode=mode, order=1)) as attr:
            losses[mode] = attr.step(*case.batches(0), None).target_loss
            assert {n: x.training for n, x in m.named_modules()} == modes, "every submodule's mode restored"
    with torch.no_grad():
        expected = case.target_loss(copy.deepcopy(model).eval(), None)
    torch.testing.assert_close(losses["eval"], expected, rtol=1e-12, atol=0)
    assert not torch.allclose(losses["train"], expected), "with dropout 0.3 a train-mode target loss differs"
