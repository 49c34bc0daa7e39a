"""Per-sample product kernels vs explicit per-sample gradients (one autograd.grad per sample), float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardshap.ghost import Capture, UnsupportedModule, plan
from shardshap.testing import cases


@pytest.fixture(autouse=True)
def _float64():
    """These checks run in float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def sum_sq_and_reference(model, loss_fn, micro_batches):
    """Capture.sum_of_squares (materialised per-sample gradients, summed over every use) vs explicit."""
    pl = plan(model, [])
    cap = Capture(pl)
    sizes = []
    for j, mb in enumerate(micro_batches):
        with cap.recording(torch.arange(mb[-1]), j):
            loss_fn(model, mb).sum().backward()
        sizes.append(mb[-1])
    params = list(pl.params.values())
    ours = cap.sum_of_squares({id(p) for p in params}, torch.float64, budget=40)  # tiny chunks
    cap.remove()
    ref = {id(p): torch.zeros_like(p) for p in params}
    for mb in micro_batches:
        losses = loss_fn(model, mb)
        for i in range(losses.shape[0]):
            for g, p in zip(torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True), params):
                if g is not None:
                    ref[id(p)] += g * g
    for p in params:
        assert torch.allclose(ours[id(p)], ref[id(p)], rtol=1e-10, atol=1e-14)


def ghost_and_reference(model, loss_fn, micro_batches, K=3, exclude=()):
    """Ghost products <g_i, W_k> for random W, and the same from explicit per-sample gradients."""
    pl = plan(model, list(exclude))
    cap = Capture(pl)
    W = {id(p): torch.randn(K, *p.shape, dtype=torch.float64) for p in pl.params.values()}
    sizes = []
    for j, mb in enumerate(micro_batches):
        with cap.recording(torch.arange(mb[-1]), j):
            losses = loss_fn(model, mb)
            losses.sum().backward()
        sizes.append(mb[-1])
    per_param = cap.products(W, torch.float64).per_param
    ghost = torch.stack(list(per_param.values())).sum(0)
    cap.remove()
    params = list(pl.params.values())
    ref = []
    for mb in micro_batches:
        losses = loss_fn(model, mb)
        for i in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            ref.append(torch.stack([sum((g * W[id(p)][k]).sum() for g, p in zip(gs, params) if g is not None)
                                    for k in range(K)]))
    return ghost, torch.stack(ref)


def assert_exact(ghost, ref, tol=1e-10):
    err = ((ghost - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"relative error {err:.3e}"
    assert ref.abs().max() > 0


class Wrap(nn.Module):
    """Feeds x through `body` and reduces to one loss per sample that mixes all outputs nonlinearly."""
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        y = self.body(x)
        return (y.tanh() ** 2).flatten(1).sum(1)


def run_body(body, x, micro=1):
    model = Wrap(body)
    chunks = [(c, c.shape[0]) for c in x.chunk(micro)]
    sum_sq_and_reference(model, lambda m, mb: m(mb[0]), chunks)
    return ghost_and_reference(model, lambda m, mb: m(mb[0]), chunks)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (5, 4, 7), (5, 2, 3, 7)])
def test_linear(bias, shape):
    assert_exact(*run_body(nn.Linear(7, 6, bias=bias), torch.randn(*shape)))
    assert_exact(*run_body(nn.Linear(7, 9, bias=bias), torch.randn(*shape)))  # the other contraction side


def test_hf_conv1d():
    from transformers.pytorch_utils import Conv1D
    assert_exact(*run_body(Conv1D(6, 7), torch.randn(5, 4, 7)))
    assert_exact(*run_body(Conv1D(9, 7), torch.randn(5, 4, 7)))


def test_layernorm_and_rmsnorm():
    for norm in [nn.LayerNorm(7), nn.LayerNorm((3, 7)), nn.LayerNorm(7, bias=False), nn.RMSNorm(7),
                 nn.RMSNorm((3, 7), eps=1e-3)]:
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_()
        assert_exact(*run_body(nn.Sequential(nn.Linear(7, 7), norm) if isinstance(norm.normalized_shape, tuple)
                               and len(norm.normalized_shape) == 1 else norm, torch.randn(5, 3, 7)))


class TwiceNormed(nn.Module):
    """One norm module called twice in a forward (two captures of the same parameters)."""
    def __init__(self, norm):
        super().__init__()
        self.norm, self.mix = norm, nn.Linear(7, 7)

    def forward(self, x):
        return self.norm(self.mix(self.norm(x)).tanh())


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(7), lambda: nn.RMSNorm(7)])
def test_norm_called_twice_over_micro_batches(norm):
    m = norm()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    assert_exact(*run_body(TwiceNormed(m), torch.randn(6, 3, 7), micro=2))


def test_norms_keep_per_sample_gradients_not_activations():
    """Norm layers reduce in the backward hook: a [b, d] gradient per call, the input released."""
    model = Wrap(nn.Sequential(nn.Linear(7, 7), nn.LayerNorm(7)))
    cap = Capture(plan(model, []))
    with cap.recording(torch.arange(5), 0):
        model(torch.randn(5, 4, 7)).sum().backward()
    (call,) = cap.calls["body.1"]
    assert call.a is None and call.e is None
    assert {k: tuple(v.shape) for k, v in call.grads.items()} == {"weight": (5, 7), "bias": (5, 7)}
    cap.remove()


def test_hf_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(7, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    assert_exact(*run_body(nn.Sequential(nn.Linear(7, 7), norm), torch.randn(5, 4, 7)))


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(4, 6, 3), lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2),
    lambda: nn.Conv1d(4, 6, 4, padding="same", groups=2), lambda: nn.Conv2d(3, 4, 3),
    lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), groups=2, bias=False),
    lambda: nn.Conv2d(2, 4, 4, padding="same", dilation=2)])
def test_conv(conv):
    m = conv()
    x = torch.randn(5, m.in_channels, 9) if isinstance(m, nn.Conv1d) else torch.randn(5, m.in_channels, 8, 7)
    assert_exact(*run_body(m, x))


class TiedLM(nn.Module):
    """Embedding with a padding row, a position embedding called with [1, T] indices (as HF GPT-2 does),
    and an output head tied to the token embedding."""
    def __init__(self, V=11, d=6):
        super().__init__()
        self.tok = nn.Embedding(V, d, padding_idx=0)
        self.pos = nn.Embedding(16, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T).unsqueeze(0))
        h = self.mix(h).tanh()
        return F.cross_entropy(self.head(h).transpose(1, 2), ids.roll(-1, 1), reduction="none").mean(1)


def test_embedding_tied_head_and_broadcast_positions():
    torch.manual_seed(1)
    model = TiedLM()
    ids = torch.randint(0, 11, (6, 5))
    ids[0, 3:] = 0  # padding rows get no gradient
    ghost, ref = ghost_and_reference(model, lambda m, mb: m(mb[0]), [(ids, 6)])
    assert_exact(ghost, ref)
    sum_sq_and_reference(model, lambda m, mb: m(mb[0]), [(ids[:4], 4), (ids[4:], 2)])
    # gradient accumulation: two micro-batches, rows in order
    ghost2, ref2 = ghost_and_reference(model, lambda m, mb: m(mb[0]), [(ids[:4], 4), (ids[4:], 2)])
    assert_exact(ghost2, ref2)


@pytest.mark.parametrize("make", [cases.tiny_gpt2, cases.tiny_llama])
def test_whole_transformers_with_padding_masks(make):
    case = make(batch_size=6, n_targets=3)
    (ids, mask), _ = case.batches(0)
    assert (mask == 0).any(), "the batch must contain padded positions"
    loss = lambda m, mb: case.train_loss(m, mb[0])
    ghost, ref = ghost_and_reference(case.model, loss, [((ids, mask), 6)], K=3)
    assert_exact(ghost, ref)
    sum_sq_and_reference(case.model, loss, [((ids, mask), 6)])


def test_unsupported_parameter_is_listed_and_exclusion_recorded():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(UnsupportedModule, match=r"scale \(in Scaled\).*exclude"):
        plan(Scaled(), [])
    pl = plan(Scaled(), ["scale"])
    assert pl.excluded == ["scale"] and set(pl.params) == {"lin.weight", "lin.bias"}


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("make", [cases.tiny_gpt2, cases.tiny_llama])
def test_layers_of_one_shape_batched_together_keep_their_own_products(make, K, monkeypatch):
    """Capture.products runs the calls of same-shaped layers as one batched call (capture.GROUP_NUMBERS):
    every parameter's per-sample products still equal its own explicit ones (a mix-up of layers within a
    batch would keep the sum over parameters and fail here), and equal those taken one call at a time."""
    from shardshap import foreach
    from shardshap.ghost import capture as capture_module
    monkeypatch.setattr(foreach, "BATCH_KERNELS", True)  # (the accelerator path; a CPU takes calls one by one)
    case = make(batch_size=5, n_targets=K)
    (ids, mask), _ = case.batches(0)
    model = case.model
    pl = plan(model, [])
    W = {id(p): torch.randn(K, *p.shape) for p in pl.params.values()}

    def products():
        cap = Capture(pl)
        with cap.recording(torch.arange(5), 0):
            case.train_loss(model, (ids, mask)).sum().backward()
        out = cap.products(W, torch.float64).per_param
        cap.remove()
        return out
    calls = []
    real = capture_module._batched_products
    monkeypatch.setattr(capture_module, "_batched_products",
                        lambda group, dtype: calls.append(len(group)) or real(group, dtype))
    batched = products()
    assert calls and max(calls) >= 2, "no layers were batched together"
    monkeypatch.setattr(capture_module, "GROUP_NUMBERS", 0)  # every call on its own
    alone = products()
    losses = case.train_loss(model, (ids, mask))
    names, params = list(pl.params), list(pl.params.values())
    ref = {n: torch.zeros(5, K) for n in names}
    for i in range(5):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for n, p, g in zip(names, params, grads):
            if g is not None:
                ref[n][i] = (W[id(p)].reshape(K, -1) @ g.reshape(-1))
    for n in names:
        assert_exact(batched[n], ref[n])
        torch.testing.assert_close(batched[n], alone[n], rtol=1e-12, atol=1e-14)
