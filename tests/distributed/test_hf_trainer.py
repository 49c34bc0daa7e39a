"""ShardshapCallback under torchrun with Trainer's DDP, FSDP2 (2 gloo ranks, float64) and DeepSpeed ZeRO-1/2/3
(float32): every step's values equal the one-process Trainer run with the same global batch, the trained
parameters follow it, and training with the callback equals training without it, bit for bit."""
import functools
import os

import numpy as np
import pytest

from helpers.distributed import BIN, TESTS, launch, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]
WORKER = os.path.join(TESTS, "distributed", "workers", "hf_trainer.py")
STEPS = 3


@functools.lru_cache(maxsize=2)
def one_process(dtype: str, folder: str):
    prefix = os.path.join(folder, f"one-{dtype}")
    proc, _ = launch([os.path.join(BIN, "python"), WORKER, "--out", prefix, "--dtype", dtype], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(f"{prefix}.rank0.npz")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hf"))
    return lambda dtype: one_process(dtype, folder)


def check(prefix, one, ranks=2, tol=1e-9, params_tol=(1e-9, 1e-12)):
    got = [np.load(f"{prefix}.rank{r}.npz") for r in range(ranks)]
    for step in range(STEPS):
        ref = dict(zip(one[f"ids{step}"].tolist(), one[f"scores{step}"]))
        ids = [i for g in got for i in g[f"ids{step}"].tolist()]
        assert sorted(ids) == sorted(ref), "the ranks' samples are the one process's global batch"
        scale = np.abs(one[f"scores{step}"]).max()
        for g in got:
            err = max(np.abs(v - ref[i]).max() for i, v in zip(g[f"ids{step}"].tolist(), g[f"scores{step}"])) / scale
            assert err <= tol, f"step {step}: relative error {err:.2e}"
    for name in (k for k in one.files if not k.startswith(("ids", "scores"))):
        np.testing.assert_allclose(got[0][name], one[name], rtol=params_tol[0], atol=params_tol[1], err_msg=name)
    return got


def check_plain(engine, prefix, got, *flags):
    """The same run without the callback trains to the same bits."""
    proc, _ = launch(torchrun("hf_trainer.py", "--engine", engine, "--out", prefix + "-plain", "--plain", *flags),
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = np.load(f"{prefix}-plain.rank0.npz")
    for name in plain.files:
        assert np.array_equal(plain[name], got[0][name]), name


@pytest.mark.parametrize("engine,checkpointing", [("ddp", False), ("fsdp", True)])
def test_trainer_under_torchrun_matches_one_process(tmp_path, reference, engine, checkpointing):
    prefix = str(tmp_path / engine)
    flags = ["--checkpointing"] if checkpointing else []
    proc, _ = launch(torchrun("hf_trainer.py", "--engine", engine, "--out", prefix, *flags), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"BACKEND {'DDPBackend' if engine == 'ddp' else 'DTensorBackend'}" in proc.stdout
    got = check(prefix, reference("float64"))
    if not checkpointing:
        check_plain(engine, prefix, got)


@pytest.mark.deepspeed
@pytest.mark.parametrize("engine,ranks,checkpointing", [("zero1", 2, False), ("zero2", 2, False),
                                                        ("zero3", 2, True), ("zero2", 1, False)])
def test_trainer_with_deepspeed_matches_one_process(tmp_path, reference, engine, ranks, checkpointing):
    """TrainingArguments(deepspeed=...): DeepSpeed clips and steps inside the boundary backward; float32 (the
    values to 1e-6 of the largest, the parameters to float32 rounding after 3 AdamW steps). One rank: the case
    that failed before with an error about the optimizer."""
    prefix = str(tmp_path / f"{engine}-{ranks}")
    flags = ["--dtype", "float32"] + (["--checkpointing"] if checkpointing else [])
    proc, _ = launch(torchrun("hf_trainer.py", "--engine", engine, "--out", prefix, *flags, nproc=ranks),
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BACKEND ZeroBackend" in proc.stdout
    got = check(prefix, reference("float32"), ranks=ranks, tol=1e-6, params_tol=(1e-4, 1e-5))
    if engine == "zero2" and ranks == 2:
        check_plain(engine, prefix, got, "--dtype", "float32")
