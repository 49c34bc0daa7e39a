"""LayerNorm and RMSNorm (torch and HF Llama/Qwen-style): grad_gamma = sum_t e_t * xhat_t, reduced in the
backward hook ([b, d] per sample kept instead of the input and output gradient)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ProductRule, register


def _affine_grads(xhat, e, names, shape):
    """Per-sample gradients of gamma (and beta); `xhat` is a fresh tensor of ours, multiplied in place."""
    b = e.shape[0]
    nfeat = int(torch.Size(shape).numel())
    e3 = e.reshape(b, -1, nfeat)
    out = {}
    if "weight" in names:
        out["weight"] = xhat.reshape(b, -1, nfeat).mul_(e3).sum(1).view(b, *shape)
    if "bias" in names:
        out["bias"] = e3.sum(1).view(b, *shape)
    return out


@register(nn.LayerNorm)
class LayerNormRule(ProductRule):
    tokenwise = True
    reduce_in_backward = True

    def per_sample_grads(self, module, a, e, names):
        shape = tuple(module.normalized_shape)
        return _affine_grads(F.layer_norm(a, shape, eps=module.eps), e, names, shape)


def rms_normalize(a: torch.Tensor, ndim: int, eps: float) -> torch.Tensor:
    dims = tuple(range(a.dim() - ndim, a.dim()))
    return a * torch.rsqrt(a.pow(2).mean(dims, keepdim=True) + eps)


@register(nn.RMSNorm)
class RMSNormRule(ProductRule):
    tokenwise = True
    param_names = ("weight",)
    reduce_in_backward = True

    @staticmethod
    def _xhat(module, a):
        eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
        return rms_normalize(a, len(module.normalized_shape), eps)

    def per_sample_grads(self, module, a, e, names):
        return _affine_grads(self._xhat(module, a), e, names, tuple(module.normalized_shape))


def _is_hf_rmsnorm(module) -> bool:
    # LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, ...: weight * x * rsqrt(mean(x^2) + eps) over the last
    # dim (Gemma's (1 + weight) form has the same gradient with respect to weight).
    own = dict(module.named_parameters(recurse=False))
    return (type(module).__name__.endswith("RMSNorm") and set(own) == {"weight"}
            and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")))


@register(match=_is_hf_rmsnorm)
class HFRMSNormRule(ProductRule):
    tokenwise = True
    param_names = ("weight",)
    reduce_in_backward = True

    @staticmethod
    def _xhat(module, a):
        eps = getattr(module, "variance_epsilon", None)
        eps = module.eps if eps is None else eps
        # HF normalises in float32 whatever the model dtype; mirror it so products stay exact
        return rms_normalize(a.float(), 1, float(eps)).to(a.dtype)

    # sizes come from the input: a partitioned weight (ZeRO-3) is empty outside its forward
    def per_sample_grads(self, module, a, e, names):
        return _affine_grads(self._xhat(module, a), e, names, (a.shape[-1],))
