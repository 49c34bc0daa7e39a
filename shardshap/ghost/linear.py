"""nn.Linear and transformers' GPT-2 Conv1D: <grad_W l_i, W> = sum_t e_t^T W a_t, one GEMM."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .lowrank import Factors, lowrank_products
from .registry import ProductRule, bias_products, register
from .sketch import outer_sum


def matrix_products(a: torch.Tensor, e: torch.Tensor, Ww: torch.Tensor, Wb: Optional[torch.Tensor] = None):
    """(sum_t e_{i,t}^T W_k a_{i,t} [b, K], bias products [b, K] or None) for a [b, T, din], e [b, T, dout],
    Ww [K, dout, din] and optionally Wb [K, dout].

    The cheapest exact contraction (measured on CPU, docs/benchmarks.md): for few targets, one GEMM with
    W on the smaller side first (the temporary is [b, T, K, min(din, dout)], never [b, T, K, vocab] for an
    LM head), then a fused dot (vecdot: einsum's bmm here was 3-10x slower than the GEMM itself). When
    that GEMM runs over e, the bias columns ride along (one pass over e); otherwise the bias products are
    left to the caller (None). For K >= 4 targets, per-sample gradients in chunks of samples cost one GEMM
    whatever K.
    """
    b, T, din = a.shape
    K, dout, _ = Ww.shape
    if K >= PER_SAMPLE_MIN_TARGETS and T > 1:
        return _via_per_sample(a, e, Ww), None
    if dout > din:
        M = Ww.permute(1, 0, 2).reshape(dout, K * din)
        if Wb is not None:
            M = torch.cat([M, Wb.reshape(K, dout).T], 1)
        proj, other, d = e.reshape(b * T, dout) @ M, a, din
    else:
        proj, other, d, Wb = a.reshape(b * T, din) @ Ww.reshape(K * dout, din).T, e, dout, None
    weight = torch.linalg.vecdot(proj[:, :K * d].view(b, T, K, d), other.reshape(b, T, 1, d)).sum(1)
    return weight, (None if Wb is None else proj[:, K * d:].reshape(b, T, K).sum(1))


PER_SAMPLE_MIN_TARGETS = 4
PER_SAMPLE_CHUNK = 1 << 24  # numbers per chunk of per-sample gradients (64 MiB in fp32)


def _via_per_sample(a, e, Ww):
    b, T, din = a.shape
    K, dout, _ = Ww.shape
    step = max(1, PER_SAMPLE_CHUNK // (din * dout))
    flat = Ww.reshape(K, dout * din)
    out = []
    for lo in range(0, b, step):
        g = torch.bmm(e[lo:lo + step].transpose(1, 2), a[lo:lo + step])  # [c, dout, din]
        out.append(g.view(g.shape[0], -1) @ flat.T)
    return torch.cat(out)


def weight_products(a3, e3, Ww, Wb=None):
    """(weight, bias or None) products: exact, or low-rank when Capture.products passes `Factors`
    (Config.product_rank)."""
    if isinstance(Ww, Factors):
        return lowrank_products(a3, e3, Ww, Wb)
    return matrix_products(a3, e3, Ww, Wb)


@register(nn.Linear)
class LinearRule(ProductRule):
    tokenwise = True
    batchable = True
    low_precision_pays = True
    sketched = ("weight",)

    @staticmethod
    def weight_matrix(Ww):
        """[K, dout, din] view of W["weight"] (its own inverse: also maps back)."""
        return Ww

    def products(self, module, a, e, W):
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        e3 = e.reshape(e.shape[0], -1, e.shape[-1])
        out = {}
        if "weight" in W:
            Ww = W["weight"]
            out["weight"], bias = weight_products(a3, e3, Ww if isinstance(Ww, Factors) else self.weight_matrix(Ww),
                                                  W.get("bias"))
            if bias is not None:
                out["bias"] = bias
        if "bias" in W and "bias" not in out:
            out["bias"] = bias_products(e3, W["bias"])
        return out

    @staticmethod
    def token_factors(a3, e3):
        """(x, y) with the weight's per-sample gradient sum_t x_t y_t^T in its own shape ([d_out, d_in])."""
        return e3, a3

    def sketch(self, module, a, e, U, V):
        x, y = self.token_factors(a.reshape(a.shape[0], -1, a.shape[-1]), e.reshape(e.shape[0], -1, e.shape[-1]))
        return outer_sum(x @ U, y @ V)

    def per_sample_grads(self, module, a, e, names):
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        e3 = e.reshape(e.shape[0], -1, e.shape[-1])
        out = {"weight": self.weight_matrix(torch.einsum("bto,bti->boi", e3, a3))} if "weight" in names else {}
        if "bias" in names:
            out["bias"] = e3.sum(1)
        return out


def _is_hf_conv1d(module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


@register(match=_is_hf_conv1d)
class HFConv1DRule(LinearRule):
    """transformers.pytorch_utils.Conv1D: y = x @ weight + bias with weight [din, dout]."""

    @staticmethod
    def weight_matrix(Ww):
        return Ww.transpose(1, 2)

    @staticmethod
    def token_factors(a3, e3):
        return a3, e3  # the weight is [d_in, d_out]
