"""SIGKILL of one rank, then `train.resume=true`, gives the store and weights of an uninterrupted run.

For each engine (DDP, FSDP2, DeepSpeed ZeRO-2), on 2 gloo ranks of the reference trainer (launch/train.py
under torchrun) with a tiny GPT-2, 6 steps and a checkpoint every 2 steps:
  1. an uninterrupted run gives the reference store totals and final weights;
  2. the same config in another out_dir is SIGKILLed on one rank at the start of its 6th step (0-based
     step 5): the checkpoints after steps 2 and 4 exist (`latest` names the second), the 5th step was
     computed but never committed to the store, and the other rank is inside the 6th step's collectives.
     torchrun then ends with an error and no summary is written;
  3. `train.resume=true` in the killed run's out_dir resumes at step 4 and runs the 5th and 6th steps (the
     5th still an AdamW cold-start step, counted by the restored optimizer state; the 6th not).
Claim: the resumed store's totals equal the uninterrupted run's (counts exactly, values to 1e-6 relative;
in practice bit-identical) and so do the final weights (exactly: all three engines are deterministic on CPU
with gloo, the resumed run repeats the same arithmetic).

The kill is made deterministic by a driver script (written by the test, not part of the library) that runs
launch/train.py with one hook: the chosen rank, when it reaches the kill step, writes its pid to a file and
sleeps; the test waits for that file and SIGKILLs the pid. Waiting for `latest` alone would race with the end
of a run whose steps take tens of milliseconds."""
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shardshap.store import open_scores

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
STEPS, EVERY, KILL_STEP = 6, 2, 5  # kill at 0-based step 5: the latest checkpoint is step 4 (0-based 3 done)
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")

# Runs launch/train.py as torchrun's worker, with one hook: rank KILL_RANK stops at the start of step
# KILL_STEP (before drawing its batch), publishes its pid and waits to be SIGKILLed by the test.
DRIVER = '''
import os, runpy, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.environ["TRAIN_PY"])))  # this checkout's shardshap
import shardshap.recipe.train as T
kill_rank, kill_step, pidfile = int(os.environ["KILL_RANK"]), int(os.environ["KILL_STEP"]), os.environ["PIDFILE"]
local_ids = T.Sampler.local_ids
def paused(self, step, rank):
    if rank == kill_rank and step == kill_step:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)  # the test never reads a half-written pid
        time.sleep(600)
    return local_ids(self, step, rank)
T.Sampler.local_ids = paused
sys.argv = [os.environ["TRAIN_PY"], *sys.argv[1:]]
runpy.run_path(os.environ["TRAIN_PY"], run_name="__main__")
'''

ENGINES = {  # engine -> (distributed section, rank to kill: both ranks are covered across the engines)
    "ddp": ({"engine": "ddp"}, 1),
    "fsdp2": ({"engine": "fsdp2"}, 0),
    "deepspeed": ({"engine": "deepspeed", "deepspeed": {
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": False}}}, 1),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("demo_corpus", ROOT / "launch" / "demo_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_demo_corpus(str(tmp_path_factory.mktemp("data")), per_domain=16, val=4)  # 48 sequences


def config(path: Path, corpus: dict, distributed: dict) -> Path:
    cfg = {"model": {"family": "gpt2", "n_layer": 1, "d_model": 32, "n_head": 2},
           "data": {"corpus": [corpus["train"]], "seq_len": 32, "truncate": True, "val_sequences": 4,
                    "validation": {"code": corpus["val_code"], "prose": corpus["val_prose"]}},
           "train": {"steps": STEPS, "micro_batch": 2, "grad_accum": 2, "lr": 3e-3, "warmup": 2,
                     "max_grad_norm": 0.5, "seed": 1, "threads": 1, "checkpoint": {"every": EVERY}},
           # a surviving rank stuck in a collective gives up after 60 s even if torchrun did not stop it
           "distributed": {**distributed, "timeout_s": 60},
           # cold_steps 5 (default 10): 0-based steps 0-4 use the Owen cold start, 5 the secant, so the
           # resumed run crosses that switch; fewer Owen steps also keep the test fast
           "attribution": {"overwrite": True, "cold_steps": 5}}
    path.write_text(json.dumps(cfg))
    return path


@contextlib.contextmanager
def launched(script, cfg, out_dir, log_path, *sets, env=ENV):
    """torchrun on 2 ranks of `script` with the config, output to `log_path`; yields (process, log file). In a
    session of its own, so that whatever happens the test ends torchrun and both workers together (killing
    torchrun alone on a timeout would leave its workers running)."""
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", str(script),
           "--config", str(cfg), "--set", f"out_dir={out_dir}", *[a for s in sets for a in ("--set", s)]]
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc, log
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait(proc, log, timeout, what):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: torchrun still running after {timeout} s:\n{_tail(log)}")


def _tail(log, n=4000):
    log.flush()
    log.seek(0)
    return log.read()[-n:]


def train(cfg, out_dir, *sets, log_name="train.log", timeout=300) -> dict:
    """launch/train.py to the end; returns its summary."""
    with launched(ROOT / "launch" / "train.py", cfg, out_dir, out_dir.parent / log_name, *sets) as (proc, log):
        assert _wait(proc, log, timeout, out_dir.name) == 0, _tail(log)
    return json.loads((out_dir / "summary.json").read_text())


def train_and_kill_one_rank(tmp_path, cfg, out_dir, kill_rank, timeout=300):
    """Start the run under the driver, SIGKILL rank `kill_rank` when it reaches KILL_STEP, wait for torchrun
    to end; returns (torchrun's exit status, the end of its output)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    pidfile = tmp_path / f"rank{kill_rank}.pid"
    env = dict(ENV, KILL_RANK=str(kill_rank), KILL_STEP=str(KILL_STEP), PIDFILE=str(pidfile),
               TRAIN_PY=str(ROOT / "launch" / "train.py"))
    with launched(driver, cfg, out_dir, tmp_path / "killed.log", env=env) as (proc, log):
        deadline = time.time() + timeout
        while not pidfile.exists():
            assert proc.poll() is None, f"the run ended before the kill:\n{_tail(log)}"
            assert time.time() < deadline, f"rank {kill_rank} never reached step {KILL_STEP}:\n{_tail(log)}"
            time.sleep(0.05)
        latest = out_dir / "checkpoints" / "latest"
        assert latest.read_text() == f"step_{KILL_STEP - 1:08d}", "the kill must come after a checkpoint"
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        # torchrun sees the dead worker and stops the other one (which also fails on its own: gloo reports
        # the closed connection, or its collective times out after distributed.timeout_s)
        rc = _wait(proc, log, 120, f"after rank {kill_rank} was killed")
        return rc, _tail(log)


def final_weights(out_dir: Path, engine: str) -> dict:
    """The model state dict of the last checkpoint (step STEPS), as each engine saved it."""
    step = out_dir / "checkpoints" / f"step_{STEPS:08d}"
    if engine == "ddp":
        return torch.load(step / "rank0.pt", weights_only=False)["model"]
    if engine == "deepspeed":  # ZeRO-2 keeps whole parameters on every rank; rank 0's file holds them
        return torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(step / "dcp", out_dir / "final.pt")  # gathers the FSDP2 shards, one process
    return torch.load(out_dir / "final.pt", weights_only=False)["model"]


@pytest.mark.parametrize("engine", [
    "ddp", "fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_sigkill_one_rank_then_resume_equals_uninterrupted(engine, corpus, tmp_path):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    distributed, kill_rank = ENGINES[engine]
    cfg = config(tmp_path / "cfg.json", corpus, distributed)

    ref_dir = tmp_path / "uninterrupted"
    train(cfg, ref_dir, log_name="uninterrupted.log")
    ref = open_scores(ref_dir / "run.zarr")
    assert ref.count.sum() == STEPS * 8  # 6 steps x global batch 8 (2 ranks x 2 micro-batches x 2)

    run_dir = tmp_path / "killed"
    rc, out = train_and_kill_one_rank(tmp_path, cfg, run_dir, kill_rank)
    assert rc != 0, out
    assert not (run_dir / "summary.json").exists(), "the killed run must not have finished"
    # the checkpoint after 4 steps committed 0-based steps 0-3 on both ranks; step 4 was only buffered (it
    # never counts) and the next checkpoint (after 6 steps) was never started
    assert open_scores(run_dir / "run.zarr").committed_steps.tolist() == [KILL_STEP - 2] * 2
    assert not (run_dir / "checkpoints" / f"step_{KILL_STEP + 1:08d}").exists()

    summary = train(cfg, run_dir, "train.resume=true", log_name="resumed.log")
    assert summary["resumed_at"] == KILL_STEP - 1 and summary["steps"] == STEPS

    res = open_scores(run_dir / "run.zarr")
    assert res.committed_steps.tolist() == [STEPS - 1] * 2
    np.testing.assert_array_equal(res.count, ref.count)
    np.testing.assert_allclose(res.value, ref.value, rtol=1e-6, atol=1e-12)
    # and step by step: the steps after the checkpoint were rewritten as the uninterrupted run wrote them
    a, b = ref.step_log, res.step_log
    np.testing.assert_array_equal(b["sample_id"].values, a["sample_id"].values)
    for name in ("score", "sample_loss", "loss", "lr", "target_loss"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-6, atol=1e-12, err_msg=name)
    want, got = final_weights(ref_dir, engine), final_weights(run_dir, engine)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
