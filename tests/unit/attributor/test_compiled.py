"""torch.compile'd models with torch's default settings: the values of the eager model, the model's own
parameter names, no recompilation storm, and a clear refusal when dynamo reuses graphs compiled before the
Attributor's hooks existed."""
import copy

import pytest
import torch
import torch._dynamo

import shardshap
from shardshap.testing import cases


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a recompilation storm fails the test
        yield
    torch._dynamo.reset()


def gpt2():
    case = cases.tiny_gpt2(batch_size=8)
    case.model.config._attn_implementation = "sdpa"
    return case


def test_compiled_values_equal_eager_with_default_settings():
    assert torch._functorch.config.donated_buffer, "torch's default: compiled backwards donate their buffers"
    case = gpt2()
    eager = copy.deepcopy(case.model)
    cfg = shardshap.Config(exclude=["transformer.wpe.*"])  # 2 targets, the batch-first probe
    compiled = torch.compile(case.model)
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with shardshap.Attributor(model, opt, case.train_loss, case.target_loss, cfg) as attr:
            runs[name] = [attr.step(*case.batches(s), None) for s in range(3)]
            names = list(attr.plan.params)
    assert names[0] == "transformer.wte.weight" and not any("_orig_mod" in n for n in names)
    assert runs["compiled"][0].metadata["excluded"] == ["transformer.wpe.weight"]
    for e, c in zip(runs["eager"], runs["compiled"]):
        torch.testing.assert_close(c.scores, e.scores, rtol=1e-7, atol=1e-12)
    for p, q in zip(case.model.parameters(), eager.parameters()):  # (compiled kernels round differently)
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_graphs_compiled_without_the_hooks_are_refused_before_the_step():
    case = gpt2()
    model = torch.compile(case.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    case.train_loss(model, case.batches(0)[0]).mean().backward()  # compiled before the Attributor existed
    opt.zero_grad()
    before = copy.deepcopy(case.model.state_dict())
    attr = shardshap.Attributor(model, opt, case.train_loss, case.target_loss, shardshap.Config())
    with pytest.raises(shardshap.AttributionError, match=r"without shardshap's hooks.*torch._dynamo.reset\(\)"):
        attr.step(*case.batches(1), None)
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k]), "the refused step must not train"
    torch._dynamo.reset()  # the fix the error names
    attr.step(*case.batches(1), None)
    attr.close()
