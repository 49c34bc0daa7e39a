"""Tensor parallelism's local products (ProductRule.local_view): the products of a split weight taken on each
slice of it, with the captures that slice meets, add up to explicit per-sample gradients dotted with W (one
autograd.grad per sample), float64; no process group needed."""
import torch
from torch import nn

from shardshap.ghost.embedding import EmbeddingRule
from shardshap.ghost.linear import LinearRule


def per_sample_dots(module, inputs, W):
    """[b, K]: <grad of sample i's loss sum(output * probe), W[k]>, explicitly."""
    torch.manual_seed(1)
    probe = torch.randn_like(module(inputs), dtype=torch.float64)
    rows = []
    for i in range(inputs.shape[0]):
        (g,) = torch.autograd.grad((module(inputs[i:i + 1]) * probe[i:i + 1]).sum(), [module.weight])
        rows.append((W * g).flatten(1).sum(1))
    return torch.stack(rows), probe


def test_vocabulary_split_embedding_adds_up_over_its_slices():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=7).double()
    idx = torch.randint(0, 10, (3, 5))
    idx[0, 0] = 7  # the padding row never receives gradient
    W = torch.randn(2, 10, 4, dtype=torch.float64)
    reference, e = per_sample_dots(emb, idx, W)
    rule, total = EmbeddingRule(), 0
    for start, length in ((0, 5), (5, 5)):  # the two ranks' rows
        view, a, e_local = rule.local_view(emb, idx, e, {"weight": (0, start, length)})
        total = total + rule.products(view, a, e_local, {"weight": W[:, start:start + length]})["weight"]
    torch.testing.assert_close(total, reference, rtol=1e-12, atol=1e-12)


def test_column_and_row_split_linear_add_up_over_their_slices():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    W = torch.randn(2, 4, 6, dtype=torch.float64)
    reference, e = per_sample_dots(lin, x, W)
    rule = LinearRule()
    columns = sum(rule.products(lin, x, e[..., rows], {"weight": W[:, rows]})["weight"]  # output features
                  for rows in (slice(0, 2), slice(2, 4)))
    rows_ = sum(rule.products(lin, x[..., cols], e, {"weight": W[:, :, cols]})["weight"]  # input features
                for cols in (slice(0, 3), slice(3, 6)))
    torch.testing.assert_close(columns, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows_, reference, rtol=1e-12, atol=1e-12)
