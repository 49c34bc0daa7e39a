"""Low-rank products (Config.product_rank), the exact contraction paths, and presets. No timing here."""
import copy

import pytest
import torch
from torch import nn

import shardshap
from shardshap.ghost import Capture, plan
from shardshap.ghost.linear import matrix_products
from shardshap.ghost.lowrank import MIN_ENERGY, factorize, lowrank_products
from shardshap.testing import cases
from shardshap.testing.references import assert_same, assert_training_unchanged, plain_step

DT = torch.float64


def low_rank(K, d_out, d_in, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, d_out, rank, generator=g, dtype=DT) @ torch.randn(K, rank, d_in, generator=g, dtype=DT)


def reference(a, e, Ww):
    return torch.einsum("bto,koi,bti->bk", e, Ww, a)


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_exact_contraction_paths(K, shape):
    d_out, d_in = shape
    a, e = torch.randn(3, 7, d_in, dtype=DT), torch.randn(3, 7, d_out, dtype=DT)
    Ww = torch.randn(K, d_out, d_in, dtype=DT)
    Wb = torch.randn(K, d_out, dtype=DT)
    torch.testing.assert_close(matrix_products(a, e, Ww)[0], reference(a, e, Ww), rtol=1e-12, atol=1e-12)
    weight, bias = matrix_products(a, e, Ww, Wb)
    torch.testing.assert_close(weight, reference(a, e, Ww), rtol=1e-12, atol=1e-12)
    if bias is not None:  # folded into the GEMM over e
        torch.testing.assert_close(bias, torch.einsum("bto,ko->bk", e, Wb), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [3, 5])
def test_factors_reproduce_a_low_rank_matrix(rank):
    W = low_rank(2, 50, 30, rank=3)
    f = factorize(W, rank)
    torch.testing.assert_close(f.dense(), W, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f.energy, torch.ones(2, dtype=DT), rtol=1e-12, atol=1e-12)
    a, e = torch.randn(4, 6, 30, dtype=DT), torch.randn(4, 6, 50, dtype=DT)
    torch.testing.assert_close(lowrank_products(a, e, f)[0], reference(a, e, W), rtol=1e-9, atol=1e-9)
    Wb = torch.randn(2, 50, dtype=DT)
    weight, bias = lowrank_products(a, e, f, Wb)
    torch.testing.assert_close(weight, reference(a, e, W), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bias, torch.einsum("bto,ko->bk", e, Wb), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("power_iters", [0, 1])
def test_energy_of_a_projection(power_iters):
    W = low_rank(1, 60, 40, rank=40) @ torch.diag(0.8 ** torch.arange(40, dtype=DT))  # a decaying spectrum
    f = factorize(W, 4, power_iters=power_iters)
    S = torch.linalg.svdvals(W[0])
    best = (S[:4].square().sum() / S.square().sum()).sqrt()
    assert 0 < f.energy.item() <= best.item() + 1e-12  # a projection keeps at most the top-4 energy
    # the energy reported is that of the dense approximation, and more power iterations get closer to the best
    torch.testing.assert_close(f.energy, torch.linalg.matrix_norm(f.dense()) / torch.linalg.matrix_norm(W))
    assert f.energy.item() > (0.98 if power_iters else 0.9) * best.item()
    torch.testing.assert_close(f.right @ f.right.transpose(1, 2), torch.eye(4, dtype=DT).unsqueeze(0))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.fc = nn.Linear(64, 64)
        self.conv = Conv1D(48, 64)  # HF Conv1D: weight [d_in, d_out]
        self.head = nn.Linear(48, 64)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.fc(x)))))


def products(model, W, rank, b=5, T=4):
    cap = Capture(plan(model, []))
    x = torch.randn(b, T, 64, dtype=DT, generator=torch.Generator().manual_seed(1))
    with cap.recording(torch.arange(b), 0):
        model(x).square().mean((1, 2)).sum().backward()
    result = cap.products(W, DT, rank=rank)
    cap.remove()
    return result.per_param, result.lowrank, result.W


def test_capture_with_rank_at_least_the_true_rank_is_exact():
    model = Net().to(DT)
    W = {id(p): (low_rank(2, *p.shape, rank=3, seed=i) if p.dim() == 2 else torch.randn(2, *p.shape, dtype=DT))
         for i, p in enumerate(model.parameters())}
    exact, _, _ = products(model, W, None)
    W_copy = {k: v.clone() for k, v in W.items()}
    approx, info, W_used = products(model, W_copy, rank=4)
    assert set(info["energy"]) == {"fc.weight", "conv.weight", "head.weight"} and not info["exact_layers"]
    assert set(info["layer_rank"].values()) == {4}
    assert all(abs(v - 1) < 1e-9 for v in info["energy"].values())
    for name in exact:
        torch.testing.assert_close(approx[name], exact[name], rtol=1e-8, atol=1e-10)
    for k in W:  # the approximation used equals the original (its rank is 3); the caller's W is untouched
        torch.testing.assert_close(W_used[k], W[k], rtol=1e-8, atol=1e-10)
        assert torch.equal(W_copy[k], W[k])


def test_low_energy_layers_fall_back_to_exact():
    model = Net().to(DT)
    W = {id(p): torch.randn(1, *p.shape, dtype=DT) for p in model.parameters()}  # full rank: energy << 0.95
    W[id(model.fc.weight)] = low_rank(1, 64, 64, rank=2)  # this layer stays low-rank
    exact, _, _ = products(model, W, None)
    approx, info, W_used = products(model, W, rank=2)
    assert sorted(info["exact_layers"]) == ["conv.weight", "head.weight"]
    assert info["layer_rank"] == {"fc.weight": 2}
    assert info["energy"]["conv.weight"] < MIN_ENERGY and info["energy"]["fc.weight"] > 0.999
    params = dict(model.named_parameters())
    for name in ("conv.weight", "head.weight"):
        assert torch.equal(approx[name], exact[name])
        assert torch.equal(W_used[id(params[name])], W[id(params[name])])
    torch.testing.assert_close(approx["fc.weight"], exact["fc.weight"], rtol=1e-8, atol=1e-10)


def test_low_energy_layers_raise_the_rank_first():
    model = Net().to(DT)
    W = {id(p): torch.randn(1, *p.shape, dtype=DT) for p in model.parameters()}
    W[id(model.fc.weight)] = low_rank(1, 64, 64, rank=6)  # rank 2 and 4 keep < 0.95 of it, rank 8 all
    exact, _, _ = products(model, W, None)
    approx, info, _ = products(model, W, rank=2)
    assert info["layer_rank"] == {"fc.weight": 8} and info["energy"]["fc.weight"] > 1 - 1e-9
    assert sorted(info["exact_layers"]) == ["conv.weight", "head.weight"]  # full rank: tried up to 16, then exact
    torch.testing.assert_close(approx["fc.weight"], exact["fc.weight"], rtol=1e-8, atol=1e-10)


def test_tied_gpt2_low_rank_step():
    """Tied head and embedding share one W_r; the completeness check (on by default) must still pass."""
    case = cases.tiny_gpt2(batch_size=4, dtype=DT, tie=True)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-3)
    m2, o2 = copy.deepcopy((case.model, opt))
    b, ids = case.batches(0)
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                              shardshap.Config(product_rank=4, cold_start="none")) as attr:
        out = attr.step(b, ids, None)
    with shardshap.Attributor(m2, o2, case.train_loss, case.target_loss, shardshap.Config(cold_start="none")) as ex:
        ref = ex.step(b, ids, None)
    meta = out.metadata
    assert meta["product_rank"] == 4 and meta["product_energy"]
    assert set(meta["product_exact_layers"]) <= set(meta["product_energy"])
    assert torch.isfinite(out.scores).all() and out.scores.shape == ref.scores.shape
    assert "product_energy" not in ref.metadata and ref.metadata["product_rank"] is None


def step_beside_reference(case, opt, attr, ref_config, s):
    """Step `s` of `attr` and, on deep copies of the state before it, of an Attributor with `ref_config`;
    asserts Pearson R > 0.999 per target. Returns (scores, reference scores)."""
    b, ids = case.batches(s)
    m2, o2 = copy.deepcopy((case.model, opt))
    with shardshap.Attributor(m2, o2, case.train_loss, case.target_loss, ref_config) as reference:
        ref = reference.step(b, ids, None).scores
    out = attr.step(b, ids, None).scores
    for k in range(ref.shape[1]):
        r = torch.corrcoef(torch.stack([out[:, k], ref[:, k]]))[0, 1].item()
        assert r > 0.999, f"step {s} target {k}: R {r:.5f}"
    return out, ref


@pytest.mark.parametrize("rank,target", [(None, None), (4, None), (None, "bfloat16")])
def test_bf16_cache_values_track_exact_and_training_is_unchanged(rank, target):
    """Config(cache_dtype='bfloat16'): captures kept in bf16, products in bf16 (alone, with low rank, and with
    the target pass under bf16 autocast as preset 'fast' runs it).
    The reference is exact float32 mode on copies of the same state (itself checked against torch.func
    per-sample gradients in test_ghost.py); parameters must equal plain training bit for bit."""
    case = cases.tiny_gpt2(batch_size=8, dtype=torch.float32, tie=True)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3, weight_decay=0.1)
    ref_model, ref_opt = copy.deepcopy((case.model, opt))
    seen = []

    def target_loss(m, t):  # records whether the target pass runs under bf16 autocast
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return case.target_loss(m, t)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, target_loss,
                                shardshap.Config(cache_dtype="bfloat16", product_rank=rank, max_grad_norm=1.0,
                                                 target_dtype=target))
    assert attr.capture.cache_dtype == torch.bfloat16
    for s in range(13):  # cold (Owen) and warm steps; the completeness check (2% for bf16) runs on every step
        out, ref = step_beside_reference(case, opt, attr, shardshap.Config(product_rank=rank, max_grad_norm=1.0), s)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.sum(0), ref.sum(0), rtol=2e-2, atol=1e-3 * ref.abs().sum().item())
        plain_step(ref_model, ref_opt, case.train_loss, [case.batches(s)[0]], 1.0)
    attr.close()
    assert seen and all(x == (target is not None) for x in seen)
    assert_same(case.model, opt, ref_model, ref_opt)


@pytest.mark.parametrize("at_once,large", [(False, False), (True, False), (True, True)],
                         ids=["kernel-by-kernel", "batched", "batched-large"])
def test_auto_target_dtype_autocasts_where_casts_pay(at_once, large, monkeypatch):
    """target_dtype='auto' (preset 'fast'): the target pass runs under bf16 autocast where attribution runs
    kernel by kernel (a CPU). Where attribution batches its kernels (accelerators, foreach.BATCH_KERNELS) it takes
    the user's autocast around step(); without one, none while the captures are small (casts would cost
    launches), bf16 when they are larger than CAST_LATER_NUMBERS."""
    from shardshap import foreach
    from shardshap.ghost import capture
    monkeypatch.setattr(foreach, "BATCH_KERNELS", at_once)
    if large:
        monkeypatch.setattr(capture, "CAST_LATER_NUMBERS", 0)
    case = cases.tiny_gpt2(batch_size=4, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3)
    seen = []

    def target_loss(m, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return case.target_loss(m, t)
    with shardshap.Attributor(case.model, opt, case.train_loss, target_loss, shardshap.Config(preset="fast")) as attr:
        assert attr.config.target_dtype == "auto"
        attr.step(*case.batches(0), None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attr.step(*case.batches(1), None)
    assert seen == [not at_once or large, True]


def test_bf16_target_pass_with_hvp_curvature():
    """target_dtype='bfloat16' with curvature='hvp': the double backward runs under the same autocast; the
    values track float32 hvp values on copies of the same state (warm steps; training unchanged)."""
    case = cases.tiny_gpt2(batch_size=8, dtype=torch.float32, tie=True)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3, weight_decay=0.1)
    ref_model, ref_opt = copy.deepcopy((case.model, opt))
    config = dict(curvature="hvp", cold_start="none", max_grad_norm=1.0)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(target_dtype="bfloat16", **config))
    for s in range(6):
        step_beside_reference(case, opt, attr, shardshap.Config(**config), s)
        plain_step(ref_model, ref_opt, case.train_loss, [case.batches(s)[0]], 1.0)
    attr.close()
    assert_same(case.model, opt, ref_model, ref_opt)


def test_bf16_capture_keeps_bf16_and_products_track_float32():
    model = Net().float()
    W = {id(p): torch.randn(2, *p.shape) for p in model.parameters()}
    x = torch.randn(5, 4, 64, generator=torch.Generator().manual_seed(1))
    out = {}
    for cache in (None, torch.bfloat16):
        cap = Capture(plan(model, []), cache_dtype=cache)
        with cap.recording(torch.arange(5), 0):
            model(x).square().mean((1, 2)).sum().backward()
        calls = [c for cs in cap.calls.values() for c in cs]
        assert {c.a.dtype for c in calls} == {c.e.dtype for c in calls} == {cache or torch.float32}
        out[cache] = cap.products(W, torch.float32).per_param
        cap.remove()
    for name, ref in out[None].items():
        assert out[torch.bfloat16][name].dtype == torch.float32
        torch.testing.assert_close(out[torch.bfloat16][name], ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_bf16_cache_warns_where_bf16_is_emulated(monkeypatch):
    case = cases.tiny_gpt2(batch_size=4, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters())
    make = lambda: shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                        shardshap.Config(preset="fast")).close()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    with pytest.warns(UserWarning, match="bf16 attribution math.*CPU without AMX.*preset='lowrank'"):
        make()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()


def test_presets_resolve_and_validate():
    fast, exact = shardshap.Config(preset="fast"), shardshap.Config(preset="exact")
    lowrank = shardshap.Config(preset="lowrank")
    assert (fast.product_rank, fast.cache_dtype, fast.target_dtype) == (None, "bfloat16", "auto")
    assert (exact.product_rank, exact.cache_dtype) == (None, None)
    assert (lowrank.product_rank, lowrank.cache_dtype) == (16, None)
    assert (fast.compile_math, lowrank.compile_math, exact.compile_math) == (True, True, False)
    assert shardshap.Config(preset="lowrank", product_rank=16).product_rank == 16  # agreeing is fine
    assert shardshap.Config(preset="fast", order=1).order == 1                  # fields it does not set stay free
    with pytest.raises(shardshap.ConfigError, match="preset='lowrank' sets product_rank=16"):
        shardshap.Config(preset="lowrank", product_rank=8)
    with pytest.raises(shardshap.ConfigError, match="preset='fast' sets compile_math=True"):
        shardshap.Config(preset="fast", compile_math=False)  # an explicit False is not silently overridden
    with pytest.raises(shardshap.ConfigError, match="preset='fast' sets product_rank=None"):
        shardshap.Config(preset="fast", product_rank=8)
    with pytest.raises(shardshap.ConfigError, match="cache_dtype"):
        shardshap.Config(cache_dtype="float16")
    with pytest.raises(shardshap.ConfigError, match="target_dtype"):
        shardshap.Config(target_dtype="float16")
    with pytest.raises(shardshap.ConfigError, match="preset='exact' sets product_rank=None"):
        shardshap.Config(preset="exact", product_rank=8)
    with pytest.raises(shardshap.ConfigError, match="preset"):
        shardshap.Config(preset="fastest")
    for bad in (0, -1, 2.5, True, "16"):
        with pytest.raises(shardshap.ConfigError, match="product_rank"):
            shardshap.Config(product_rank=bad)
    assert shardshap.Config.from_dict(fast.to_dict()) == fast
    helps = shardshap.Config.fields_help()
    assert "rank" in helps["product_rank"] and "fast" in helps["preset"] and "bf16" in helps["cache_dtype"]


@pytest.mark.parametrize("rank", [2, 16])
def test_training_unchanged_with_product_rank(rank):
    """The sketch uses a private generator: dropout masks, parameters and optimizer state are unchanged."""
    case = cases.tiny_gpt2(batch_size=4, dtype=torch.float32, n_embd=32, dropout=0.1)
    case.model.train()
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-3, weight_decay=0.1)
    assert_training_unchanged(case, opt, shardshap.Config(product_rank=rank, max_grad_norm=1.0), clip=1.0)


def test_cold_steps_take_exact_products(monkeypatch):
    """Under cold_start='owen' Adam's cold steps take exact products (their sign-like updates have no low-rank
    structure: near initialisation a rank-16 LM head kept 0.955 of W and R fell to 0.974,
    benchmarks/preset_fidelity.py); the first warm step is factorised (any kept energy accepted here)."""
    import shardshap.ghost.capture as capture_module
    monkeypatch.setattr(capture_module, "MIN_ENERGY", 0.0)
    case = cases.tiny_gpt2(batch_size=6, dtype=torch.float32)
    runs = {}
    for rank in (None, 4):
        model = copy.deepcopy(case.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with shardshap.Attributor(model, opt, case.train_loss, case.target_loss,
                                  shardshap.Config(product_rank=rank, cold_steps=2, max_grad_norm=1.0)) as attr:
            runs[rank] = [attr.step(*case.batches(s), None) for s in range(3)]
    exact, low = runs[None], runs[4]
    for s in (0, 1):
        assert low[s].metadata["cold_start"] and not low[s].metadata.get("product_layer_rank")
        assert torch.equal(low[s].scores, exact[s].scores)
    assert not low[2].metadata["cold_start"] and low[2].metadata["product_layer_rank"], "the warm step is low rank"
    assert not torch.equal(low[2].scores, exact[2].scores)
