"""ShardshapCallback under torchrun with Trainer's DDP and FSDP2 (2 gloo ranks, float64): every step's values
equal the one-process Trainer run with the same global batch, the trained parameters follow it, and training
with the callback equals training without it."""
import os

import numpy as np
import pytest

from helpers.distributed import BIN, TESTS, launch, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]
WORKER = os.path.join(TESTS, "distributed", "workers", "hf_trainer.py")
STEPS = 3


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("hf") / "one")
    proc, _ = launch([os.path.join(BIN, "python"), WORKER, "--out", prefix], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(f"{prefix}.rank0.npz")


def check(prefix, one):
    got = [np.load(f"{prefix}.rank{r}.npz") for r in range(2)]
    for step in range(STEPS):
        ref = dict(zip(one[f"ids{step}"].tolist(), one[f"scores{step}"]))
        ids = [i for g in got for i in g[f"ids{step}"].tolist()]
        assert sorted(ids) == sorted(ref), "the ranks' samples are the one process's global batch"
        scale = np.abs(one[f"scores{step}"]).max()
        for g in got:
            err = max(np.abs(v - ref[i]).max() for i, v in zip(g[f"ids{step}"].tolist(), g[f"scores{step}"])) / scale
            assert err <= 1e-9, f"step {step}: relative error {err:.2e}"
    for name in (k for k in one.files if not k.startswith(("ids", "scores"))):
        np.testing.assert_allclose(got[0][name], one[name], rtol=1e-9, atol=1e-12, err_msg=name)
    return got


@pytest.mark.parametrize("engine,checkpointing", [("ddp", False), ("ddp", True), ("fsdp", True)])
def test_trainer_under_torchrun_matches_one_process(tmp_path, one_process, engine, checkpointing):
    prefix = str(tmp_path / engine)
    flags = ["--checkpointing"] if checkpointing else []
    proc, _ = launch(torchrun("hf_trainer.py", "--engine", engine, "--out", prefix, *flags), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"BACKEND {'DDPBackend' if engine == 'ddp' else 'FSDP2Backend'}" in proc.stdout
    got = check(prefix, one_process)
    if not checkpointing:  # the same run without the callback trains to the same bits
        proc, _ = launch(torchrun("hf_trainer.py", "--engine", engine, "--out", prefix + "-plain", "--plain"),
                         timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        plain = np.load(f"{prefix}-plain.rank0.npz")
        for name in plain.files:
            assert np.array_equal(plain[name], got[0][name]), name
