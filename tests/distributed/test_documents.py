"""Per-position sample ids under DDP and FSDP2 (2 gloo ranks): a document cut across ranks gets the sum of
its parts, once, and every value equals one process's on the same global batches."""
import functools
import os
import sys

import numpy as np
import pytest
import torch

from helpers.distributed import TESTS, launch, torchrun

sys.path.insert(0, os.path.join(TESTS, "distributed", "workers"))
from documents import STEPS, config, dtype_of, rows_of  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@functools.lru_cache(maxsize=2)
def one_process(dtype):
    import shardshap
    from shardshap.testing import cases
    case = cases.packed_lm("gpt2", dtype=dtype)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    values, losses = [], []
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, config()) as attr:
        for step in range(STEPS):
            out = attr.step(*rows_of(case, step, [0, 1]), None)
            values.append(dict(zip(out.sample_ids.tolist(), out.scores.numpy())))
            losses.append(dict(zip(out.sample_ids.tolist(), out.sample_loss.numpy())))
    return values, losses, {n: p.detach().numpy() for n, p in case.model.named_parameters()}


@pytest.mark.parametrize("engine", ["ddp", "fsdp", pytest.param("zero2", marks=pytest.mark.deepspeed),
                                    pytest.param("zero3", marks=pytest.mark.deepspeed)])
def test_documents_across_ranks_match_one_process(tmp_path, engine):
    """DDP and FSDP2 in float64 (to 1e-9), DeepSpeed ZeRO-2/3 in float32 (to 3e-5 of the largest value: a
    document sums many token parts that cancel, and float32 rounding of the two runs reaches 1.1e-5)."""
    prefix, store = str(tmp_path / engine), str(tmp_path / f"{engine}.zarr")
    proc, _ = launch(torchrun("documents.py", "--engine", engine, "--out", prefix, "--store", store), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dtype = dtype_of(engine)
    tol = 1e-9 if dtype == torch.float64 else 3e-5
    values, losses, params = one_process(dtype)
    got = [np.load(f"{prefix}.rank{r}.npz") for r in range(2)]
    totals = np.zeros((1000, 2))
    for step in range(STEPS):
        ids = [g[f"ids{step}"].tolist() for g in got]
        assert sorted(ids[0] + ids[1]) == sorted(values[step]), "every document once, on one rank"
        scale = np.abs(np.stack(list(values[step].values()))).max()
        for g, rank_ids in zip(got, ids):
            ref = np.stack([values[step][i] for i in rank_ids])
            err = np.abs(g[f"scores{step}"] - ref).max() / scale
            assert err <= tol, f"step {step}: relative error {err:.2e}"
            np.testing.assert_allclose(g[f"loss{step}"], [losses[step][i] for i in rank_ids], rtol=tol)
        for i, v in values[step].items():
            totals[i] += v
    assert any(set(g["ids0"].tolist()) != set(documents_of(0, r)) for r, g in enumerate(got)), \
        "step 0 must cut a document across the ranks"
    from shardshap.store import open_scores
    np.testing.assert_allclose(open_scores(store).value, totals, rtol=1e-5, atol=1e-5 * np.abs(totals).max())
    for name, ref in params.items():
        np.testing.assert_allclose(got[0][name], ref, rtol=tol if dtype == torch.float64 else 1e-4,
                                   atol=1e-12 if dtype == torch.float64 else 1e-5, err_msg=name)


def documents_of(step, rank):
    from shardshap.testing import cases
    case = cases.packed_lm("gpt2")
    return set(torch.cat([i[i >= 0] for i in rows_of(case, step, [rank])[1]]).tolist())
