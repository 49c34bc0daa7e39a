"""Running ranks from tests: the global batches every distributed test splits the same way, the
one-process reference for them, and a launcher for torchrun / mpiexec / deepspeed subprocesses."""
import functools
import os
import signal
import subprocess
import sys
import time

import torch

import shardshap
from shardshap.testing import cases

STEPS, GLOBAL_BATCH, MICRO = 4, 8, 2
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def local_micro_batches(case, step, rank, world):
    """This rank's share of the global batch of `step`, as MICRO micro-batches."""
    (ids_, mask), sample_ids = case.batches(step)
    per_rank = GLOBAL_BATCH // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    ids_, mask, sample_ids = ids_[sl], mask[sl], sample_ids[sl]
    chunks = lambda t: list(t.chunk(MICRO))
    return [tuple(x) for x in zip(chunks(ids_), chunks(mask))], chunks(sample_ids)


@functools.lru_cache(maxsize=4)
def single_process_reference(clip, lr=3e-3, model="gpt2", **config):
    """Plain torch, one process, the same global batches (rank 0's micro-batches, then rank 1's): per step
    {sample id: values}, the clip factors, and the final parameters and Adam moments by name. `model`: the case
    (tiny_gpt2; for tensor and sequence parallelism tiny_transformer, or tiny_llama with 2 key-value heads);
    `config`: further shardshap.Config fields."""
    build = {"gpt2": cases.tiny_gpt2, "transformer": cases.tiny_transformer,
             "llama": functools.partial(cases.tiny_llama, kv_heads=2)}[model]
    case = build(batch_size=GLOBAL_BATCH, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(max_grad_norm=clip, **config))
    values, clips = [], []
    for step in range(STEPS):
        micro, ids = [], []
        for r in range(2):
            m, i = local_micro_batches(case, step, r, 2)
            micro += m
            ids += i
        out = attr.step(micro, ids, None)
        values.append(dict(zip(out.sample_ids.tolist(), out.scores.numpy())))
        clips.append(out.clip_factor)
    state = {n: p.detach().numpy().copy() for n, p in case.model.named_parameters()}
    for n, p in case.model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}:{n}"] = opt.state[p][key].numpy().copy()
    return values, clips, state


def assert_values_follow_float32(paths, clip, min_r=0.99):
    """Each rank's values (the npz files at `paths`) correlate with one float32 process's on every step and
    target: runs whose forward is bf16 play a game that differs by rounding."""
    import numpy as np
    values, _, _ = single_process_reference(clip)
    for path in paths:
        got = np.load(path)
        for step in range(STEPS):
            ref = np.stack([values[step][int(i)] for i in got["ids"][step]])
            for k in range(ref.shape[1]):
                R = np.corrcoef(got["scores"][step][:, k], ref[:, k])[0, 1]
                assert R >= min_r, f"{path} step {step} target {k}: R {R:.4f}"


def launch(cmd, timeout=300, **env):
    """Run a launcher command with one thread per rank and the test helpers importable; returns
    (CompletedProcess, seconds)."""
    path = os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])
    full = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR="cpu",
                PYTHONPATH=path, **env)
    t0 = time.time()
    # a session of its own: on a timeout the launcher and every rank it started are killed, not only the launcher
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.time() - t0


def torchrun(script, *args, nproc=2):
    """The torchrun command line for a worker script in tests/distributed/workers."""
    return [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
            os.path.join(TESTS, "distributed", "workers", script), *args]
