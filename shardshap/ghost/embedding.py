"""nn.Embedding: <grad_E l_i, W> = sum_t W[idx_t] . e_t, a gather (tied heads add their own use)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ..errors import UnsupportedModule
from .registry import ProductRule, register
from .sketch import outer_sum


@register(nn.Embedding)
class EmbeddingRule(ProductRule):
    tokenwise = True
    param_names = ("weight",)
    sketched = ("weight",)

    def validate(self, module, name):
        if module.max_norm is not None:
            raise UnsupportedModule(f"{name}: Embedding(max_norm=...) renormalises its weight in the "
                                      "forward; per-sample products do not support it")

    def per_sample_view(self, module, args, output, batch_size):
        # HF GPT-2 looks up positions with indices [1, T]: the gradient reaching the module would be summed
        # over the batch and the samples mixed (a 10% error, measured)
        idx = args[0]
        if batch_size > 1 and idx.dim() >= 1 and idx.shape[0] == 1:
            return idx.expand(batch_size, *idx.shape[1:]), output.expand(batch_size, *output.shape[1:])
        return None

    def local_view(self, module, a, e, splits):
        """A vocabulary-split embedding (rows start..start+length on this rank) as an embedding of its own rows:
        the tokens of other ranks' rows (and padding) get a zero output gradient."""
        dim, start, length = splits["weight"]
        if dim == 0:  # (a split of the features meets the local output gradient as it is)
            keep = (a >= start) & (a < start + length)
            if module.padding_idx is not None:
                keep &= a != module.padding_idx
            a = torch.where(keep, a - start, 0)
            e = e * keep.unsqueeze(-1).to(e.dtype)
            module = SimpleNamespace(padding_idx=None, num_embeddings=length)
        return module, a, e

    @staticmethod
    def _flat(module, a, e):
        b = a.shape[0]
        idx = a.reshape(b, -1)
        e = e.reshape(b, idx.shape[1], -1)
        if module.padding_idx is not None:  # the padding row never receives gradient
            e = e * (idx != module.padding_idx).unsqueeze(-1).to(e.dtype)
        return idx, e

    def products(self, module, a, e, W):
        if "weight" not in W:
            return {}
        idx, e = self._flat(module, a, e)
        rows = W["weight"][:, idx]  # [K, b, T, d]
        K, b = rows.shape[:2]
        # vecdot, not einsum: einsum's batched-matmul path was several times slower on CPU
        return {"weight": torch.linalg.vecdot(rows.reshape(K, b, -1), e.reshape(1, b, -1)).T}

    def sketch(self, module, a, e, U, V):
        idx, e = self._flat(module, a, e)  # the gradient is sum_t onehot(idx_t) e_t^T: U^T onehot is a row of U
        return outer_sum(U[idx], e @ V)

    def per_sample_grads(self, module, a, e, names):
        idx, e = self._flat(module, a, e)
        b, V = idx.shape[0], module.num_embeddings
        out = e.new_zeros(b * V, e.shape[-1])
        rows = (torch.arange(b, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        out.index_add_(0, rows, e.reshape(-1, e.shape[-1]))
        return {"weight": out.view(b, V, -1)}
