"""nn.Conv1d / nn.Conv2d: unfold the input into patches, then products as for a Linear, per group."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModule
from .registry import ProductRule, bias_products, register


@register(nn.Conv1d, nn.Conv2d)
class ConvRule(ProductRule):
    low_precision_pays = True

    def validate(self, module, name):
        if module.padding_mode != "zeros":
            raise UnsupportedModule(f"{name}: Conv padding_mode={module.padding_mode!r} is not supported "
                                      "(only 'zeros')")

    def _patches(self, module, a, e):
        """Input patches [b, G, Cin/G*kh*kw, L] and output gradients [b, G, Cout/G, L]."""
        one_d = isinstance(module, nn.Conv1d)
        if one_d:  # treat as a 2-D convolution of height 1
            a, e = a.unsqueeze(2), e.unsqueeze(2)
        kernel, stride, dilation = (tuple(getattr(module, n)) for n in ("kernel_size", "stride", "dilation"))
        if one_d:
            kernel, stride, dilation = (1,) + kernel, (1,) + stride, (1,) + dilation
        if module.padding == "valid":
            pads = (0, 0, 0, 0)
        elif module.padding == "same":  # torch pads d*(k-1) in total, the extra one on the right
            tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2)
        else:
            p = tuple(module.padding)
            p = (0,) + p if one_d else p
            pads = (p[1], p[1], p[0], p[0])
        a = F.pad(a, pads)
        b, G = a.shape[0], module.groups
        cols = F.unfold(a, kernel, dilation=dilation, stride=stride)  # [b, Cin*kh*kw, L]
        cols = cols.view(b, G, -1, cols.shape[-1])
        return cols, e.reshape(b, G, e.shape[1] // G, -1)

    def products(self, module, a, e, W):
        cols, eg = self._patches(module, a, e)
        out = {}
        if "weight" in W:
            Ww = W["weight"]
            K, G = Ww.shape[0], module.groups
            Wg = Ww.reshape(K, G, Ww.shape[1] // G, -1)                # [K, G, Cout/G, Cin/G*kh*kw]
            proj = torch.einsum("bgol,kgoi->bkgil", eg, Wg)
            out["weight"] = torch.einsum("bkgil,bgil->bk", proj, cols)
        if "bias" in W:
            out["bias"] = bias_products(eg.flatten(1, 2).transpose(1, 2), W["bias"])
        return out

    def per_sample_grads(self, module, a, e, names):
        cols, eg = self._patches(module, a, e)
        b = cols.shape[0]
        out = {}
        if "weight" in names:
            shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
            out["weight"] = torch.einsum("bgol,bgil->bgoi", eg, cols).reshape(b, *shape)
        if "bias" in names:
            out["bias"] = eg.sum(-1).reshape(b, -1)
        return out
