"""Small real models and data for the tests: an MLP on scikit-learn's digits, a tiny GPT-2 and a tiny
Llama built from configs (nothing is downloaded). Each case gives model, per-sample train loss, target
loss (K targets) and batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    name: str
    model: nn.Module
    train_loss: Callable
    target_loss: Callable
    batches: Callable[[int], tuple[Any, torch.Tensor]]   # step -> (batch, sample_ids)
    targets: Any


def digits_mlp(batch_size=10, seed=0, dtype=torch.float64, hidden=32, n_targets=2) -> Case:
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=dtype)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    train, val = perm[:1500], perm[1500:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)

    def train_loss(m, b):
        x, t = b
        return F.cross_entropy(m(x), t, reduction="none")

    # K targets: two disjoint validation subsets
    vsets = [val[k * 40:(k + 1) * 40] for k in range(n_targets)]

    def target_loss(m, _targets):
        return torch.stack([F.cross_entropy(m(X[v]), y[v]) for v in vsets])

    def batches(step):
        idx = train[(step * batch_size + torch.arange(batch_size)) % len(train)]
        return (X[idx], y[idx]), idx

    return Case("mlp-digits", model, train_loss, target_loss, batches, None)


def lm_losses(model, ids, mask):
    """Per-sequence mean next-token loss over real (unmasked) positions."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = ids[:, 1:]
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(work),
                          tgt.reshape(-1), reduction="none").view(tgt.shape)
    m = mask[:, 1:].to(tok.dtype)
    return (tok * m).sum(1) / m.sum(1).clamp(min=1)


def _lm_case(name, model, vocab, T, batch_size, seed, n_targets, pad_some=True):
    g = torch.Generator().manual_seed(seed + 1)
    # a corpus with structure (repeated n-grams) so training actually learns something
    base = torch.randint(0, vocab, (64, T), generator=g)
    base[:, 1::2] = (base[:, 0::2] * 3 + 1) % vocab
    val = torch.randint(0, vocab, (n_targets * 4, T), generator=g)
    val[:, 1::2] = (val[:, 0::2] * 3 + 1) % vocab

    def train_loss(m, b):
        ids, mask = b
        return lm_losses(m, ids, mask)

    def target_loss(m, _t):
        mask = torch.ones_like(val)
        per = lm_losses(m, val, mask)
        return per.view(n_targets, -1).mean(1)

    def batches(step):
        idx = (step * batch_size + torch.arange(batch_size)) % len(base)
        ids = base[idx].clone()
        mask = torch.ones_like(ids)
        if pad_some:  # right padding on some samples: padded positions must contribute nothing
            lengths = T - (idx % 3)
            for r, L in enumerate(lengths.tolist()):
                mask[r, L:] = 0
                ids[r, L:] = 0
        return (ids, mask), idx

    return Case(name, model, train_loss, target_loss, batches, val)  # (target_loss reads its own copy of val)


def tiny_gpt2(batch_size=8, seed=0, dtype=torch.float64, T=12, vocab=48, n_targets=2, tie=True, n_embd=16,
              dropout=0.0) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=tie,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).to(dtype)
    return _lm_case("gpt2", model, vocab, T, batch_size, seed, n_targets)


def tiny_llama(batch_size=8, seed=0, dtype=torch.float64, T=12, vocab=48, n_targets=2, kv_heads=1) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(dtype)
    return _lm_case("llama", model, vocab, T, batch_size, seed, n_targets)


def tiny_transformer(batch_size=8, seed=0, dtype=torch.float64, T=12, vocab=48, n_targets=2) -> Case:
    """A Llama-style model written for tensor and sequence parallelism (testing/tensor_parallel.py)."""
    from .tensor_parallel import TinyTransformer
    torch.manual_seed(seed)
    return _lm_case("transformer", TinyTransformer(vocab=vocab).to(dtype), vocab, T, batch_size, seed, n_targets)


def packed_lm(family="gpt2", rows=4, seed=0, dtype=torch.float64, T=12, vocab=48, n_targets=2,
              document_masked=True) -> Case:
    """Documents of 3-10 tokens packed into rows of T tokens (several per row, some cut across rows).
    batch = (input_ids, attention_mask, position_ids): document-masked attention with positions restarting
    per document (`document_masked`), or plain causal attention over the row. sample_ids are per position:
    train_loss returns [rows, T-1] next-token losses, their ids the document of each (-1 across documents)."""
    from ..packing import document_attention, next_token_ids, position_ids
    torch.manual_seed(seed)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=0)).to(dtype)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=32, tie_word_embeddings=False)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    tokens, owner, d = [], [], 0
    while len(tokens) < 64 * T:
        n = int(torch.randint(3, 11, (1,), generator=g))
        doc = torch.randint(1, vocab, (n,), generator=g)
        doc[1::2] = (doc[0::2][:len(doc[1::2])] * 3 + 1) % vocab  # structure to learn
        tokens += doc.tolist()
        owner += [d] * n
        d += 1
    stream = torch.tensor(tokens[:64 * T]).view(64, T)
    docs = torch.tensor(owner[:64 * T]).view(64, T)
    val = torch.randint(0, vocab, (n_targets * 4, T), generator=g)
    val[:, 1::2] = (val[:, 0::2] * 3 + 1) % vocab

    def train_loss(m, b):
        ids, mask, pos = b
        logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none").view(
            ids.shape[0], -1)

    def target_loss(m, _t):
        return lm_losses(m, val, torch.ones_like(val)).view(n_targets, -1).mean(1)

    def batches(step):
        idx = (step * rows + torch.arange(rows)) % len(stream)
        ids, dd = stream[idx], docs[idx]
        if document_masked:
            return (ids, document_attention(dd, dtype), position_ids(dd)), next_token_ids(dd)
        return (ids, None, None), next_token_ids(dd)

    return Case(f"packed-{family}", model, train_loss, target_loss, batches, None)
