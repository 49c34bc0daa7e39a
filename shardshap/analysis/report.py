"""The numbers of `shardshap report`, computed from a store (and its manifest when there is one)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .manifest import Manifest


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of 'a low score flags a positive': P(score of a random positive < score of a random
    negative), ties counted half (Mann-Whitney U with average ranks)."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u_pos_above = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(1.0 - u_pos_above / (n_pos * n_neg))


def step_blocks(scores, names=("sample_id", "score", "sample_loss")):
    """Yield (first_step, {name: array}) over the committed part of the log, one chunk row at a time
    (bounded memory whatever the run length). Slots of a rank beyond its committed step (left by a
    crashed rank) read as missing, as in `ScoreStore.step_log` and reduce."""
    committed = scores.committed_steps  # one snapshot: a live writer may commit meanwhile
    first, n = scores.steps or (0, int(committed.max()) + 1)  # a view of a window of steps reads only those
    per = scores.layout.steps_per_chunk
    for lo in range(first, n, per):
        yield lo, scores.read_steps(lo, min(n, lo + per), names, committed=committed)


def mean_sample_loss(scores) -> np.ndarray:
    """[num_samples] mean training loss of each sample at the steps it took part in (NaN if never)."""
    N = scores.layout.num_samples
    total, cnt = np.zeros(N), np.zeros(N)
    for _, blk in step_blocks(scores, ("sample_id", "sample_loss")):
        ids, loss = blk["sample_id"].reshape(-1), blk["sample_loss"].reshape(-1)
        ok = (ids >= 0) & np.isfinite(loss)
        total += np.bincount(ids[ok], weights=loss[ok], minlength=N)
        cnt += np.bincount(ids[ok], minlength=N)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / cnt


def build_report(scores, manifest: Optional[Manifest] = None, top: int = 5,
                 junk_domain: str = "junk") -> dict:
    value, count = scores.value, scores.count
    seen = count > 0
    total = value.sum(1)
    window = scores.steps
    rep = {
        "store": scores.path, "run_id": scores.attrs.get("run_id"),
        "steps": scores.num_steps if window is None else window[1] - window[0],
        "step_window": None if window is None else list(window),
        "samples_seen": int(seen.sum()), "num_samples": int(len(count)), "targets": scores.targets,
        "estimator": scores.attrs.get("metadata", {}).get("estimator"),
        "per_target": {t: {"mean": float(value[seen, k].mean()) if seen.any() else float("nan"),
                           "negative_share": float((value[seen, k] < 0).mean()) if seen.any() else float("nan")}
                       for k, t in enumerate(scores.targets)},
    }
    loss = mean_sample_loss(scores)
    if manifest is not None:
        rep["per_domain"] = {}
        for d in manifest.domains:
            sel = seen & (manifest.domain == d)
            rep["per_domain"][d] = {
                "samples": int(sel.sum()),
                "mean": {t: float(value[sel, k].mean()) if sel.any() else float("nan")
                         for k, t in enumerate(scores.targets)},
                "negative_share": float((total[sel] < 0).mean()) if sel.any() else float("nan")}
        if junk_domain in manifest.domains:
            is_junk = manifest.domain[seen] == junk_domain
            rep["auroc_low_value_is_junk"] = {t: auroc(value[seen, k], is_junk)
                                              for k, t in enumerate(scores.targets)}
            rep["auroc_low_value_is_junk"]["sum"] = auroc(total[seen], is_junk)
            rep["auroc_high_loss_is_junk"] = auroc(-loss[seen], is_junk)
    order = np.flatnonzero(seen)[np.argsort(total[seen], kind="stable")]
    describe = lambda i: {"id": int(i), "value": float(total[i]), "count": int(count[i]),
                          "loss": float(loss[i]),
                          **({"domain": manifest.domain[i], "text": manifest.text.get(int(i), "")}
                             if manifest is not None else {})}
    rep["top"] = [describe(i) for i in order[::-1][:top]]
    rep["bottom"] = [describe(i) for i in order[:top]]
    return rep
