"""DDP on 2 real CPU processes (gloo), launched by torchrun and by mpiexec: per-sample values and trained
parameters equal a single process on the same global batches."""
import os
import shutil
import sys

import numpy as np
import pytest

from helpers.distributed import (
    BIN,
    STEPS,
    TESTS,
    assert_values_follow_float32,
    launch,
    single_process_reference,
    torchrun,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]
WORKER = os.path.join(TESTS, "distributed", "workers", "ddp_fsdp.py")
CLIP = 1.0


def run(cmd, timeout=180):
    return launch(cmd, timeout=timeout)


def check_against_reference(prefix, store=None, tol=1e-5, **config):
    values, _, state = single_process_reference(CLIP, **config)
    params = {n: v for n, v in state.items() if ":" not in n}
    if store is not None:  # totals of the shared store = sums of the single-process values
        from shardshap.store import open_scores
        totals = np.zeros((64, 2))
        for step_values in values:
            for i, v in step_values.items():
                totals[i] += v
        np.testing.assert_allclose(open_scores(store).value, totals, rtol=1e-5, atol=1e-5 * np.abs(totals).max())
    for rank in range(2):
        got = np.load(f"{prefix}.rank{rank}.npz")
        for step in range(STEPS):
            ref = np.stack([values[step][int(i)] for i in got["ids"][step]])
            scale = np.abs(np.stack(list(values[step].values()))).max()
            err = np.abs(got["scores"][step] - ref).max() / scale
            assert err <= tol, f"rank {rank} step {step}: relative error {err:.2e}"
        # DDP averages gradients in another order than one process: float rounding, which Adam can
        # amplify on coordinates whose gradient is ~0 (about 1e-6 after 4 steps of lr 3e-3)
        for name, ref in params.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "fsdp-keep"])
def test_torchrun_matches_single_process(tmp_path, engine):
    """DDP and FSDP2 (reshard after forward, or not), gradient accumulation 2, clipping, AdamW. FSDP2 takes
    Config.check_timing='next-step' (a GPU's default: the checks and the store row read one step late), the
    others 'before-step' (a CPU's)."""
    prefix = str(tmp_path / engine)
    timing = "next-step" if engine == "fsdp" else "before-step"
    cmd = torchrun("ddp_fsdp.py", "--engine", engine, "--check-timing", timing)
    proc, _ = run(cmd + ["--out", prefix, "--store", prefix + ".zarr"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(prefix, store=prefix + ".zarr")
    check_training_unchanged(cmd, prefix)


def check_training_unchanged(cmd, prefix):
    """The same launch without attribution trains bit-identically (parameters of every rank)."""
    proc, _ = run(cmd + ["--out", prefix + "-plain", "--plain"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        ours, plain = np.load(f"{prefix}.rank{rank}.npz"), np.load(f"{prefix}-plain.rank{rank}.npz")
        for name in plain.files:
            assert np.array_equal(ours[name], plain[name]), name


@pytest.mark.parametrize("preset", ["fast", "lowrank"])
def test_presets_under_fsdp2(tmp_path, preset):
    """bf16 products and low-rank products with FSDP2 (W gathered module by module) give one process's values:
    the same sketch of the same gathered W (measured 2e-7 relative) and the same bf16 products up to an
    occasional rounding flip where float sums were added in another order (measured up to 4e-5)."""
    prefix = str(tmp_path / preset)
    proc, _ = run(torchrun("ddp_fsdp.py", "--engine", "fsdp", "--preset", preset, "--out", prefix))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(prefix, tol=1e-3 if preset == "fast" else 1e-5, preset=preset)


def test_fsdp2_bf16_mixed_precision(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the completeness check allows the rounding of
    bf16 gradients (before, it refused the norm layers at mismatches of 1e-3 to 2e-2), the values follow one
    float32 process (R >= 0.99 on every step and rank) and training equals plain bf16 FSDP2 training."""
    prefix = str(tmp_path / "mp")
    cmd = torchrun("ddp_fsdp.py", "--engine", "fsdp", "--mixed-precision")
    proc, _ = run(cmd + ["--out", prefix])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_values_follow_float32([f"{prefix}.rank{rank}.npz" for rank in range(2)], CLIP)
    check_training_unchanged(cmd, prefix)


@pytest.mark.parametrize("engine,predictor,rank", [("ddp", "subspace", None), ("fsdp", "subspace", None),
                                                    ("fsdp", "momentum", 2)])
def test_streaming_matches_single_process(tmp_path, engine, predictor, rank):
    """schedule='streaming', gradient accumulation 2, clipping: one process's streaming values. 'subspace':
    sketches in the backward against bases every rank finds from the same gathered W, the rank's share of
    the global gradient; 'momentum' with low rank: each module's W is gathered, factorised and dropped in
    turn before the forward (only the factors are kept)."""
    prefix = str(tmp_path / engine)
    extra = ["--product-rank", str(rank)] if rank else []
    proc, _ = run(torchrun("ddp_fsdp.py", "--engine", engine, "--schedule", "streaming", "--out", prefix,
                           "--store", prefix + ".zarr", "--stream-predictor", predictor, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(prefix, store=prefix + ".zarr", schedule="streaming", stream_predictor=predictor,
                            product_rank=rank)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_low_level_api_in_the_users_own_loop(tmp_path, engine):
    """The user's own DDP / FSDP2 loop (no_sync, backward, optimizer.step) with attr.record around each
    micro-batch and attr.attribute before the step: the same values and parameters as one process."""
    prefix = str(tmp_path / engine)
    proc, _ = run(torchrun("ddp_fsdp.py", "--engine", engine, "--low-level", "--out", prefix,
                           "--store", prefix + ".zarr"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(prefix, store=prefix + ".zarr")


@pytest.mark.skipif(shutil.which("mpiexec", path=BIN) is None, reason="mpiexec (mpich wheel) not installed")
def test_ddp_mpiexec_matches_single_process(tmp_path):
    prefix = str(tmp_path / "mpi")
    proc, _ = run([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, WORKER, "--out", prefix])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(prefix)


def test_rank_failure_ends_the_job_and_keeps_flushed_steps(tmp_path):
    store = str(tmp_path / "fail.zarr")
    proc, seconds = run(torchrun("ddp_fsdp.py", "--out", str(tmp_path / "fail"), "--fail-at-step", "2",
                                 "--store", store), timeout=240)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert seconds < 200
    # rank 1 raised inside attr.step of step 2 (rank 0 was left waiting in a collective);
    # the checkpoint after step 1 flushed both ranks: rebuilt totals hold exactly steps 0 and 1
    from shardshap.store import open_scores, reduce_store
    reduce_store(store)
    values, _, _ = single_process_reference(CLIP)
    totals = np.zeros((64, 2))
    for step_values in values[:2]:
        for i, v in step_values.items():
            totals[i] += v
    np.testing.assert_allclose(open_scores(store).value, totals, rtol=1e-5, atol=1e-7)


def test_store_of_another_run_stops_every_rank_before_training(tmp_path):
    """Rank 0 refuses the store at the first step; the other rank learns it in one collective and raises
    too (no rank left waiting at the store's barrier until the timeout), before any optimizer step."""
    from shardshap.store import ScoreWriter
    store = str(tmp_path / "other.zarr")
    ScoreWriter(store, run_id="another-run", config={}, targets=["a", "b"], num_samples=64,
                slots_per_rank=4, reduce_on_close=False).close()
    proc, seconds = run(torchrun("ddp_fsdp.py", "--out", str(tmp_path / "x"), "--store", store), timeout=240)
    assert proc.returncode != 0
    assert "[rank0]: shardshap.errors.StoreMismatchError" in proc.stderr, proc.stderr[-3000:]
    assert "[rank1]: shardshap.errors.StoreError: rank 0 refused the store" in proc.stderr, proc.stderr[-3000:]
    assert "Timeout" not in proc.stderr and seconds < 120
