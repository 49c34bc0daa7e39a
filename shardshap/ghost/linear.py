"""nn.Linear and transformers' GPT-2 Conv1D: <grad_W l_i, W> = sum_t e_t^T W a_t, one GEMM."""
from __future__ import annotations

import torch
from torch import nn

from .registry import Rule, bias_products, register


def matrix_products(a: torch.Tensor, e: torch.Tensor, Ww: torch.Tensor) -> torch.Tensor:
    """sum_t e_{i,t}^T W_k a_{i,t} for a [b, T, din], e [b, T, dout], Ww [K, dout, din] -> [b, K].

    Contract with W on the smaller side first: the temporary is [b, T, K, min(din, dout)], which
    avoids a [b, T, K, vocab] tensor for an LM head.
    """
    b, T, din = a.shape
    K, dout, _ = Ww.shape
    if dout > din:
        proj = (e.reshape(b * T, dout) @ Ww.permute(1, 0, 2).reshape(dout, K * din)).view(b, T, K, din)
        return torch.einsum("btkd,btd->bk", proj, a)
    proj = (a.reshape(b * T, din) @ Ww.reshape(K * dout, din).T).view(b, T, K, dout)
    return torch.einsum("btkd,btd->bk", proj, e)


@register(nn.Linear)
class LinearRule(Rule):
    def products(self, module, a, e, W):
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        e3 = e.reshape(e.shape[0], -1, e.shape[-1])
        out = {}
        if "weight" in W:
            out["weight"] = matrix_products(a3, e3, W["weight"])
        if "bias" in W:
            out["bias"] = bias_products(e3, W["bias"])
        return out

    def per_sample_grads(self, module, a, e, names):
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        e3 = e.reshape(e.shape[0], -1, e.shape[-1])
        out = {"weight": torch.einsum("bto,bti->boi", e3, a3)} if "weight" in names else {}
        if "bias" in names:
            out["bias"] = e3.sum(1)
        return out


def _is_hf_conv1d(module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


@register(match=_is_hf_conv1d)
class HFConv1DRule(Rule):
    """transformers.pytorch_utils.Conv1D: y = x @ weight + bias with weight [din, dout]."""

    def products(self, module, a, e, W):
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        e3 = e.reshape(e.shape[0], -1, e.shape[-1])
        out = {}
        if "weight" in W:
            out["weight"] = matrix_products(a3, e3, W["weight"].transpose(1, 2))
        if "bias" in W:
            out["bias"] = bias_products(e3, W["bias"])
        return out

    def per_sample_grads(self, module, a, e, names):
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        e3 = e.reshape(e.shape[0], -1, e.shape[-1])
        out = {"weight": torch.einsum("bti,bto->bio", a3, e3)} if "weight" in names else {}
        if "bias" in names:
            out["bias"] = e3.sum(1)
        return out
