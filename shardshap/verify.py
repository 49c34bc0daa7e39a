"""Trust check: compare the estimators with the exact Shapley values of the same real optimizer step."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from .attributor import Attributor
from .backends import detect
from .config import Config
from .estimators import ESTIMATORS
from .oracle import OracleResult, shapley


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


@dataclass
class Comparison:
    name: str                 # e.g. "secant/2"
    pearson: list[float]      # per target
    efficiency_gap: list[float]  # per target: |sum_i score_i - (U(B) - U(empty))| / |U(B) - U(empty)|
    scores: torch.Tensor


def compare_estimators(model, optimizer, train_loss, target_loss, batch, sample_ids, targets, *,
                       variants: Optional[list[dict]] = None, base: Optional[Config] = None,
                       oracle: Optional[OracleResult] = None, **oracle_kwargs) -> tuple[OracleResult, list[Comparison]]:
    """Run each estimator variant on a private copy of (model, optimizer) for the same step and compare
    its values with the exact Shapley values of the true one-step game. Nothing passed in is changed."""
    base = base or Config()
    variants = variants or [dict(estimator=e, order=o) for e in ESTIMATORS for o in (2, 1)]
    update_rule = detect(model).update_rule(optimizer)
    if oracle is None:
        oracle = shapley(model, optimizer, train_loss, target_loss, batch, targets, reduction=base.reduction,
                         max_grad_norm=base.max_grad_norm, target_mode=base.target_mode, **oracle_kwargs)
    truth = oracle.shapley
    out = []
    for v in variants:
        cfg = Config.from_dict({**base.to_dict(), **v})
        if not ESTIMATORS[cfg.estimator].supports(update_rule):
            continue
        m2, o2 = copy.deepcopy((model, optimizer))
        attr = Attributor(m2, o2, train_loss, target_loss, cfg)
        scores = attr.step(batch, sample_ids, targets).scores.double().cpu()
        attr.close()
        att = oracle.attributable
        out.append(Comparison(
            name=f"{cfg.estimator}/{cfg.order}" + ("/hvp" if cfg.order == 2 and cfg.curvature == "hvp" else "")
            + ("/no-cold-start" if cfg.estimator == "secant" and cfg.cold_start == "none" else "")
            + ("/streaming" if cfg.schedule == "streaming" else ""),
            pearson=[pearson(scores[:, k], truth[:, k]) for k in range(truth.shape[1])],
            efficiency_gap=[float(abs(scores[:, k].sum() - att[k]) / abs(att[k]).clamp_min(1e-300))
                            for k in range(truth.shape[1])],
            scores=scores))
    return oracle, out
