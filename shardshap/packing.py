"""Packed sequences: document-masked attention, and the per-position sample ids of next-token losses.

A packed row holds several documents (and parts of documents) side by side. `docs` [b, T] gives the
document of every token (-1: padding). With `document_attention` no token attends across documents and
positions restart at each document, so each document's tokens see only their own document, as if it had
been a row of its own; `next_token_ids` gives train_loss's [b, T-1] next-token losses their documents,
for `Attributor.step(batch, ids, targets)` (one value per document: docs/training.md, "Packed sequences").
"""
from __future__ import annotations

import torch


def next_token_ids(docs: torch.Tensor) -> torch.Tensor:
    """[b, T-1]: the document of each next-token loss (position j predicts token j + 1), -1 where token j + 1
    lies in another document or in padding (the cross-document label counts for no one)."""
    here, nxt = docs[:, :-1], docs[:, 1:]
    return torch.where((here == nxt) & (here >= 0), here, torch.full_like(here, -1))


def document_starts(docs: torch.Tensor) -> torch.Tensor:
    """[b, T] bool: where a new run of one document begins in its row."""
    start = torch.ones_like(docs, dtype=torch.bool)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return start


def position_ids(docs: torch.Tensor) -> torch.Tensor:
    """[b, T]: each token's position within its document's run in the row (0 at every document start)."""
    T = docs.shape[1]
    t = torch.arange(T, device=docs.device).expand_as(docs)
    begin = torch.where(document_starts(docs), t, torch.zeros_like(t)).cummax(1).values
    return t - begin


def document_attention(docs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[b, 1, T, T] additive attention mask (0 where token q may attend to token k, the dtype's lowest value
    elsewhere): causal within each run of one document (padding: within its run), nothing across runs.
    transformers models take it as `attention_mask` (with `position_ids`)."""
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    run = document_starts(docs).cumsum(1)  # runs, not ids: a document cut by a row boundary is two runs
    allowed = (run[:, :, None] == run[:, None, :]) & causal
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=docs.device)
    mask = torch.zeros(docs.shape[0], 1, T, T, dtype=dtype, device=docs.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
