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


def test_a_step_inside_autocast_keeps_attributions_math_exact():
    """`with torch.autocast(...): attr.step(...)`: the backward and attribution's own matmuls run inside the user's
    autocast. The products must not round to bf16 there (they did: the completeness check refused the step on a
    64-wide GPT-2); the values follow those of the same autocast forwards with the backward outside it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(0)
    batch, held = torch.randint(0, 512, (16, 64), generator=g), torch.randint(0, 512, (2, 64), generator=g)

    def loss(m, ids):
        logits = m(input_ids=ids).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                 reduction="none").view(len(ids), -1).mean(1)

    def inner(fn):  # autocast inside the losses only
        def wrapped(m, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(m, x)
        return wrapped

    target = lambda m, t: loss(m, t)  # noqa: E731  (two targets: one per held-out sequence)
    out = {}
    for name in ("outer", "inner"):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fns = (loss, target) if name == "outer" else (inner(loss), inner(target))
        attr = shardshap.Attributor(model, opt, *fns, shardshap.Config(cold_steps=0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "outer"):
            out[name] = attr.step(batch, torch.arange(16), held).scores
    for k in range(2):  # (the backward itself runs under the outer autocast: rounding differs, the game not)
        R = torch.corrcoef(torch.stack([out["outer"][:, k], out["inner"][:, k]]))[0, 1]
        print(f"target {k}: R outer vs inner autocast {R:.6f}")
        assert R > 0.999, R
