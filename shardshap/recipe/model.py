"""The model of a RecipeConfig (GPT-2 or Llama from `transformers`, random init or a local checkpoint) and
its losses: per-sample training loss and the stacked target loss (one per validation set)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError


def hf_config(cfg, vocab_size: int, pad_id: int):
    """The transformers config of the model section (random init)."""
    m, T = cfg.model, cfg.data.seq_len
    vocab = m.vocab_size or vocab_size
    if vocab < vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {vocab_size}; raise it or "
                          "remove it")
    positions = m.max_positions or T
    if positions < T:
        raise ConfigError(f"model.max_positions={positions} is below data.seq_len={T}; raise it or remove it")
    d_ff = m.d_ff or 4 * m.d_model
    if m.family == "gpt2":
        from transformers import GPT2Config
        return GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=m.d_model, n_layer=m.n_layer,
                          n_head=m.n_head, n_inner=d_ff, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
                          attn_pdrop=m.dropout, bos_token_id=pad_id, eos_token_id=pad_id,
                          tie_word_embeddings=m.tie_embeddings)
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=m.d_model, intermediate_size=d_ff, num_hidden_layers=m.n_layer,
                       num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head or m.n_head,
                       max_position_embeddings=positions, attention_dropout=m.dropout,
                       tie_word_embeddings=m.tie_embeddings, pad_token_id=pad_id, bos_token_id=pad_id,
                       eos_token_id=pad_id)


def build_model(cfg, vocab_size: int, pad_id: int, device="cpu") -> nn.Module:
    """Random init from the sizes (seeded by the caller), or from_pretrained of a local folder.
    device='meta' builds the shapes only (size checks)."""
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.pretrained:
        if not Path(cfg.model.pretrained).exists():
            raise ConfigError(f"model.pretrained: no folder {cfg.model.pretrained!r} (nothing is downloaded; "
                              "give a local path or remove the key for a random init)")
        model = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, local_files_only=True, dtype=dtype)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError(f"model.pretrained has {model.get_input_embeddings().num_embeddings} embeddings, "
                              f"fewer than the tokenizer's {vocab_size}; use its own tokenizer (data.tokenizer)")
        model = model.to(device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, pad_id), dtype=dtype)
    if cfg.model.activation_checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": cfg.model.activation_checkpointing == "reentrant"})
    return model


def position_losses(model, batch) -> torch.Tensor:
    """Tensor[b, T-1]: next-token cross entropy at every position (fp32 math). `batch` is (input_ids,
    attention_mask) or, for document-masked attention, (input_ids, 4-D mask, position_ids)."""
    ids, mask, *pos = batch
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos[0] if pos else None).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)


def sequence_losses(model, batch) -> torch.Tensor:
    """Tensor[b]: token-mean next-token cross entropy of each sequence, padding masked (fp32 math). With
    document-masked attention every position counts but the one whose next token starts another document."""
    tok = position_losses(model, batch)
    if len(batch) == 3:  # (the mask is 4-D: the counted positions are those not crossing documents)
        ids, _, pos = batch
        m = (pos[:, 1:] != 0).float()
    else:
        m = batch[1][:, 1:].float()
    return (tok * m).sum(1) / m.sum(1).clamp(min=1)


def target_losses(model, targets: dict) -> torch.Tensor:
    """Tensor[K]: mean sequence loss of each validation set, in the order of `targets`."""
    return torch.stack([sequence_losses(model, batch).mean() for batch in targets.values()])


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
