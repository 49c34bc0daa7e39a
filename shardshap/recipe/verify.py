"""`shardshap verify`: a user's trust check on their own model. Trains a config's model a few plain steps
(one process), then on each checked step compares every estimator's values with the exact Shapley values
of that real optimizer step (shardshap.oracle: subset enumeration with the real AdamW step). The players
are the step's sequences, or its documents with data.values_per: document."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..errors import ConfigError
from ..oracle import shapley
from ..verify import compare_estimators
from .config import RecipeConfig
from .data import Sampler, build_data
from .model import build_model, position_losses, sequence_losses, target_losses
from .train import _adamw, _plain_step, lr_lambda

VARIANTS = [dict(estimator="secant", order=2), dict(estimator="adam-lagged", order=2), dict(estimator="sgd", order=2),
            dict(estimator="sgd", order=1)]


@dataclass
class VerifyRow:
    step: int
    estimator: str
    pearson: list[float]          # per target
    efficiency_gap: list[float]   # per target: |sum of values - (U(B) - U(empty))| / |U(B) - U(empty)|


def verify(cfg: RecipeConfig, *, warm_steps: int = 12, checks: int = 2, batch: int = 8, dtype: str = "float64",
           permutations: int = 400, progress: bool = True) -> tuple[list[VerifyRow], dict]:
    """Rows of (step, estimator, Pearson R and efficiency gap per target). Batches above 12 samples use
    `permutations` antithetic Monte Carlo permutations instead of the exact enumeration."""
    from tqdm import tqdm
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    if not data.val:
        raise ConfigError("verify needs targets: add data.validation to the config")
    sampler = Sampler(data.pool, batch, 1, 1, cfg.train.seed)
    model = build_model(cfg, data.tokenizer.vocab_size, data.tokenizer.pad_id, "cpu").to(getattr(torch, dtype))
    model.train()
    opt = _adamw(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    attention, mask_dtype, per_document = cfg.data.attention, getattr(torch, dtype), cfg.data.values_per == "document"
    targets = {k: v.batch(np.arange(len(v)), "cpu", attention, mask_dtype) for k, v in data.val.items()}
    base = Config.from_dict({**cfg.attribution.shardshap_fields(), "max_grad_norm": cfg.train.max_grad_norm})
    rows = []
    steps = range(warm_steps + checks)
    bar = tqdm(steps, desc="verify", unit="step", disable=not progress)
    for step in bar:
        seqs = sampler.global_ids(step)
        mb = data.train.batch(seqs, "cpu", attention, mask_dtype)
        ids = data.train.position_ids_of(seqs) if per_document else torch.from_numpy(seqs)
        if step >= warm_steps:
            players = len(torch.unique(ids[ids >= 0])) if per_document else batch
            bar.set_postfix_str("oracle: " + ("exact, %d subsets" % 2 ** players if players <= 12
                                              else f"{permutations} permutations"))
            oracle = None
            if per_document:
                oracle = shapley(model, opt, _document_losses(ids), target_losses, mb, targets, reduction="sum",
                                 max_grad_norm=base.max_grad_norm, target_mode=base.target_mode,
                                 permutations=permutations)
            _, comparisons = compare_estimators(model, opt, position_losses if per_document else sequence_losses,
                                                target_losses, mb, ids, targets, variants=VARIANTS, base=base,
                                                permutations=permutations, oracle=oracle)
            rows += [VerifyRow(step, c.name, c.pearson, c.efficiency_gap) for c in comparisons]
        _plain_step(cfg, model, opt, None, [mb], [ids], 1)
        sched.step()
    info = {"targets": list(targets), "batch": batch, "players": "documents" if per_document else "sequences",
            "warm_steps": warm_steps, "dtype": dtype,
            "oracle": "exact" if batch <= 12 and not per_document else
            f"exact up to 12 players, else {permutations} permutations",
            "parameters": sum(p.numel() for p in model.parameters())}
    return rows, info


def _document_losses(ids: torch.Tensor):
    """train_loss of the game whose players are the documents of per-position `ids`: each document's counted
    position losses over the step's counted positions (their sum is the step's mean loss), documents in
    increasing id order (the Attributor's order for one micro-batch)."""
    docs = torch.unique(ids[ids >= 0])
    n = int((ids >= 0).sum())

    def losses(model, batch):
        per = position_losses(model, batch)
        return torch.stack([per[ids == d].sum() for d in docs]) / n
    return losses
