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


def test_eval_target_pass_keeps_activation_checkpointing():
    """transformers checkpoints a layer only in training mode: in the eval-mode target pass the checkpointed
    layers keep their own training flag (so their insides run again in the backward: the activations were
    not kept), while dropout stays off (the target loss equals the eval-mode model's)."""
    case = cases.tiny_gpt2(batch_size=4, dropout=0.3)
    model = case.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    in_target_pass, calls = [False], []
    for block in model.transformer.h:
        block.mlp.register_forward_pre_hook(  # (mode, whether it runs inside a backward: a recomputation)
            lambda m, a: calls.append((m.training, torch._C._current_graph_task_id() != -1)) if in_target_pass[0]
            else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        expected = case.target_loss(copy.deepcopy(model).eval(), None)
    with shardshap.Attributor(model, opt, case.train_loss, case.target_loss,
                              shardshap.Config(order=1, cold_start="none")) as attr:
        original = attr._target_pass

        def target_pass(*args):
            in_target_pass[0] = True
            try:
                return original(*args)
            finally:
                in_target_pass[0] = False
        attr._target_pass = target_pass
        out = attr.step(*case.batches(0), None)
    layers = len(model.transformer.h)
    assert [in_backward for _, in_backward in calls[:layers]] == [False] * layers
    assert calls[layers:] and all(in_backward for _, in_backward in calls[layers:]), "recomputed: checkpointed"
    assert not any(training for training, _ in calls), "dropout off: the layers' insides run in eval mode"
    torch.testing.assert_close(out.target_loss, expected, rtol=1e-12, atol=0)
