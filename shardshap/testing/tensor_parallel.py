"""A tiny Llama-style transformer written for tensor and sequence parallelism (as torchtitan's models are), and
its plan: `parallelize` splits it over a model-parallel mesh dimension with torch's `parallelize_module`."""
from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F
from torch import nn


def causal_attention(q, k, v, batch_dim: int = 0):
    """Causal self-attention of [B, T, heads, head_dim] queries, keys and values (the layout Ulysses' all-to-all
    takes; `batch_dim` is its argument)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.head_dim = dim // heads
        self.attention_norm = nn.RMSNorm(dim, eps=1e-6)
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.w1 = nn.Linear(dim, hidden)          # (a column-split bias)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim)          # (a row-split layer's replicated bias)
        self.attend = causal_attention  # (DeepSpeed-Ulysses: its DistributedAttention around it)

    def forward(self, x):
        h = self.attention_norm(x)
        q, k, v = self.wq(h), self.wk(h), self.wv(h)  # (this rank's heads under tensor parallelism)
        B, T = q.shape[:2]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        x = x + self.wo(self.attend(q, k, v, 0).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TinyTransformer(nn.Module):
    """Token embedding, causal attention blocks, RMSNorm, untied head; called as HF models are
    (`model(input_ids=..., attention_mask=...).logits`; right padding needs no mask under causal attention)."""

    def __init__(self, vocab: int = 48, dim: int = 16, heads: int = 2, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):  # (positions: none, the attention is causal)
        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x)
        return SimpleNamespace(logits=self.output(self.norm(x)))


def parallelize(model: TinyTransformer, mesh, sequence_parallel: bool = False) -> TinyTransformer:
    """Split `model` over the 1-D model-parallel `mesh` in place: attention and MLP column- then row-wise,
    the embedding by vocabulary, the head by vocabulary with replicated logits. `sequence_parallel`: the norms
    and the residual stream hold each rank's share of the tokens (Shard(1))."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between the blocks
    for block in model.layers:
        plan = {**{w: ColwiseParallel(input_layouts=stream) for w in ("wq", "wk", "wv", "w1", "w3")},
                "wo": RowwiseParallel(output_layouts=stream), "w2": RowwiseParallel(output_layouts=stream)}
        if sequence_parallel:
            plan.update(attention_norm=SequenceParallel(), ffn_norm=SequenceParallel())
        parallelize_module(block, mesh, plan)
    top = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
           "output": ColwiseParallel(input_layouts=stream, output_layouts=Replicate())}
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    return parallelize_module(model, mesh, top)
