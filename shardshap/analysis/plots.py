"""PNG plots of a store: value distribution per domain, composition by domain over steps (paper A,
Fig. 3), cumulative value against steps."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .manifest import Manifest
from .report import step_blocks


def _domains(scores, manifest: Optional[Manifest]):
    N = scores.layout.num_samples
    if manifest is None:
        return ["all"], np.zeros(N, dtype=np.int64)
    names = manifest.domains
    index = {d: j for j, d in enumerate(names)}
    return names, np.array([index.get(d, -1) for d in manifest.domain.tolist()], dtype=np.int64)


def per_step_domain_values(scores, manifest: Optional[Manifest]) -> tuple[list[str], np.ndarray]:
    """[steps, domains] summed values (over targets) of each domain's samples at each step."""
    names, dom = _domains(scores, manifest)
    out = np.zeros((scores.num_steps, len(names)))
    for lo, blk in step_blocks(scores, ("sample_id", "score")):
        ids, sc = blk["sample_id"], np.nan_to_num(blk["score"].sum(-1))
        for s in range(ids.shape[0]):
            ok = ids[s] >= 0
            d = dom[ids[s][ok]]
            keep = d >= 0
            out[lo + s] = np.bincount(d[keep], weights=sc[s][ok][keep], minlength=len(names))
    return names, out


def write_plots(scores, manifest: Optional[Manifest], outdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    paths = []
    value, count = scores.value, scores.count
    seen = count > 0
    names, dom = _domains(scores, manifest)

    fig, axes = plt.subplots(1, len(scores.targets), figsize=(5 * len(scores.targets), 3.6), squeeze=False)
    for k, (ax, t) in enumerate(zip(axes[0], scores.targets)):
        v = value[seen, k]
        lim = np.percentile(np.abs(v), 99) if v.size else 1.0
        bins = np.linspace(-lim, lim, 60)
        for j, d in enumerate(names):
            sel = dom[seen] == j
            if sel.any():
                ax.hist(np.clip(v[sel], -lim, lim), bins=bins, alpha=0.5, label=f"{d} (n={sel.sum()})")
        ax.axvline(0, color="k", lw=0.8)
        ax.set(title=f"value per sample, target '{t}'", ylabel="samples",
               xlabel="value (target-loss units; the outer 1% piled in the edge bins)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(outdir, "value_distribution.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    names, per_step = per_step_domain_values(scores, manifest)
    cum = np.cumsum(per_step, axis=0)
    steps = np.arange(len(cum))
    positive = np.clip(cum, 0, None)
    share = positive / np.where(positive.sum(1, keepdims=True) > 0, positive.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.stackplot(steps, share.T, labels=names, alpha=0.85)
    ax.set(title="value composition by domain (negative totals count as 0)",
           xlabel="optimizer step", ylabel="share of positive cumulative value", ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    paths.append(os.path.join(outdir, "composition_over_steps.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, d in enumerate(names):
        ax.plot(steps, cum[:, j], label=d)
    ax.plot(steps, cum.sum(1), "k--", label="all")
    ax.axhline(0, color="gray", lw=0.6)
    ax.set(title="cumulative value against steps (sum over targets)", xlabel="optimizer step",
           ylabel="cumulative value (target-loss units)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(outdir, "cumulative_value.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
