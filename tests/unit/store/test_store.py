"""Tests of the score store. Every expectation is computed independently with numpy from the data
that was written, never from the store's own output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import store_data as sw
from helpers.distributed import TESTS
from shardshap.backends import free_port
from shardshap.store import ScoreWriter, StaleTotalsError, StoreFormatError, open_scores, reduce_store

WORKER = os.path.join(TESTS, "distributed", "workers", "store.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


def _writer(path, **kw):
    args = dict(run_id="r1", config={"lr": 0.1}, targets=["a", "b"], num_samples=100,
                slots_per_rank=8, steps_per_chunk=4, max_steps=64)
    args.update(kw)
    return ScoreWriter(path, **args)


def _launch(path, world, *extra, timeout=120):
    """Run `world` writer processes with a gloo barrier; returns their exit codes."""
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, WORKER, str(path), "--rank", str(r), "--world",
                               str(world), "--init", init, *map(str, extra)], env=ENV)
             for r in range(world)]
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _rank_log(path, rank):
    """(ids, scores) per step of one rank, read with plain zarr."""
    g = zarr.open_group(str(path), mode="r")
    cols = slice(rank * sw.SPR, (rank + 1) * sw.SPR)
    return g["sample_id"][:, cols], g["score"][:, cols]


# ---------------------------------------------------------------------------- single process
def test_roundtrip_totals_log_and_missing_steps(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.zarr"
    value, count = np.zeros((100, 2)), np.zeros(100, np.int64)
    written = {}
    with _writer(path) as w:
        for t in [0, 1, 2, 5, 6, 9, 10]:  # gaps: steps 3, 4, 7, 8 never written
            b = int(rng.integers(0, 9))
            ids = rng.choice(100, b, replace=False)
            sc = rng.standard_normal((b, 2)).astype(np.float32)
            w.write_step(t, ids, sc, np.full(b, 0.25), lr=0.1 * t, loss=2.0,
                         target_losses=[1.0, 3.0], residual=-0.5, wall_time=t)
            np.add.at(value, ids, sc.astype(np.float64))
            np.add.at(count, ids, 1)
            written[t] = (ids, sc)
    s = open_scores(path)
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)
    assert s.targets == ["a", "b"] and s.attrs["run_id"] == "r1"
    log = s.step_log
    assert dict(log.sizes) == {"step": 11, "slot": 8, "target": 2}
    assert list(log["target"].values) == ["a", "b"]
    for t in range(11):
        ids_row = log["sample_id"].sel(step=t).values
        sc_row = log["score"].sel(step=t).values
        if t in written:
            b = len(written[t][0])
            np.testing.assert_array_equal(ids_row[:b], written[t][0])
            np.testing.assert_array_equal(sc_row[:b], written[t][1])
            assert (ids_row[b:] == -1).all() and np.isnan(sc_row[b:]).all()
            assert float(log["lr"].sel(step=t)) == pytest.approx(0.1 * t)
            np.testing.assert_array_equal(log["target_loss"].sel(step=t).values, [1.0, 3.0])
        else:  # unwritten steps read as missing, never zero
            assert (ids_row == -1).all() and np.isnan(sc_row).all()
            assert np.isnan(float(log["lr"].sel(step=t)))
    raw = zarr.open_group(str(path), mode="r")
    assert np.isnan(raw["score"][11:64]).all() and (raw["sample_id"][11:64] == -1).all()


def test_accepts_torch_tensors_and_1d_scores_for_one_target(tmp_path):
    torch = pytest.importorskip("torch")
    with _writer(tmp_path / "s.zarr", targets=["only"]) as w:
        w.write_step(0, torch.tensor([3, 7]), torch.tensor([1.5, -2.0], requires_grad=True))
    s = open_scores(tmp_path / "s.zarr")
    assert s.value[3, 0] == 1.5 and s.value[7, 0] == -2.0 and s.count.sum() == 2


@pytest.mark.parametrize("bad, match", [
    (dict(sample_ids=[1, 100]), "outside"),
    (dict(sample_ids=[-1, 2]), "outside"),
    (dict(sample_ids=[4, 4]), "more than once"),
    (dict(scores=np.zeros((2, 3))), "shape"),
    (dict(scores=np.zeros(2)), "shape"),
    (dict(sample_loss=np.zeros(3)), "sample_loss"),
    (dict(sample_ids=[1.0, 2.0]), "integers"),
    (dict(sample_ids=list(range(9)), scores=np.zeros((9, 2))), "slots_per_rank"),
    (dict(target_losses=[1.0]), "target_losses"),
    (dict(step=64), "max_steps"),
    (dict(step=2), "increase"),
])
def test_invalid_step_rejected_and_nothing_written(tmp_path, bad, match):
    path = tmp_path / "s.zarr"
    w = _writer(path)
    w.write_step(3, [10, 11], np.ones((2, 2)))
    args = dict(step=5, sample_ids=[1, 2], scores=np.full((2, 2), 7.0), sample_loss=None,
                target_losses=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        w.write_step(args.pop("step"), args.pop("sample_ids"), args.pop("scores"),
                     args.pop("sample_loss"), **args)
    w.close()
    s = open_scores(path)
    expect = np.zeros(100, np.int64)
    expect[[10, 11]] = 1
    np.testing.assert_array_equal(s.count, expect)  # only the valid step
    assert s.value[[10, 11]].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    raw = zarr.open_group(str(path), mode="r")
    assert (raw["sample_id"][:3] == -1).all() and (raw["sample_id"][4:] == -1).all()
    assert np.isnan(raw["score"][5]).all()


def test_other_run_or_config_refused_unless_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    with _writer(path) as w:
        w.write_step(0, [1], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="another run.*run_id.*overwrite=True"):
        _writer(path, run_id="other")
    with pytest.raises(ValueError, match="config differs"):
        _writer(path, config={"lr": 0.2})
    with pytest.raises(ValueError, match="num_samples"):
        _writer(path, num_samples=101)
    with _writer(path, run_id="other", overwrite=True) as w:
        w.write_step(0, [2], [[5.0, 5.0]])
    s = open_scores(path)
    assert s.attrs["run_id"] == "other" and s.count[1] == 0 and s.count[2] == 1


def test_overwrite_refuses_unrelated_directory(tmp_path):
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="does not look like a score store"):
        _writer(d, overwrite=True)
    assert (d / "precious.txt").exists()


def test_missing_or_corrupted_metadata_is_a_clear_error(tmp_path):
    path = tmp_path / "s.zarr"
    with _writer(path) as w:
        w.write_step(0, [1], [[1.0, 1.0]])
    good = (path / "zarr.json").read_text()

    (path / "zarr.json").unlink()
    with pytest.raises(StoreFormatError, match="no zarr.json"):
        open_scores(path)
    with pytest.raises(StoreFormatError, match="no zarr.json"):
        reduce_store(path, processes=1)

    (path / "zarr.json").write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(StoreFormatError, match="corrupted"):
        open_scores(path)
    with pytest.raises(StoreFormatError, match="corrupted"):
        _writer(path)

    meta = json.loads(good)
    meta["attributes"]["format"] = "something-else"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="not a shardshap score store"):
        open_scores(path)

    meta = json.loads(good)
    meta["attributes"]["format_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="format_version 99"):
        open_scores(path)

    (path / "zarr.json").write_text(good)
    (path / "score" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreFormatError, match="'score'"):
        open_scores(path)
    shutil.rmtree(path / "score")
    with pytest.raises(StoreFormatError, match="'score'"):
        open_scores(path)


def test_stale_totals_and_partial_files_swept(tmp_path):
    path = tmp_path / "s.zarr"
    w = _writer(path)
    for t in range(6):
        w.write_step(t, [t, t + 1], np.ones((2, 2)))
    w.flush()  # no close: totals not rebuilt
    orphan = path / "score" / "c" / "0" / "0" / "0.abc123.partial"
    orphan.write_bytes(b"junk")
    s = open_scores(path)
    with pytest.raises(StaleTotalsError, match="reduce_store"):
        s.value  # noqa: B018  (reading the totals raises)
    s.reduce(processes=1)
    assert not orphan.exists()
    expect = np.zeros(100, np.int64)
    for t in range(6):
        expect[[t, t + 1]] += 1
    np.testing.assert_array_equal(s.count, expect)
    w.close()


def test_resume_in_process_counts_nothing_twice(tmp_path):
    """Crash simulated in-process: flushed at step 9, wrote further (some chunks reached disk),
    abandoned; a new writer resumes at 10 (via state_dict) and rewrites steps >= 10."""
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(5)
    data = [(rng.choice(100, 5, replace=False), rng.standard_normal((5, 2))) for _ in range(30)]
    stale = [(rng.choice(100, 5, replace=False), rng.standard_normal((5, 2))) for _ in range(30)]
    w = _writer(path, reduce_on_close=False)
    for t in range(10):
        w.write_step(t, *data[t])
    sd = w.state_dict()
    assert sd["next_step"] == 10
    for t in range(10, 27):  # a different trajectory that must vanish
        w.write_step(t, *stale[t])
    w._queue.join()  # chunks of steps 10..23 are on disk, 24..26 only in memory
    w2 = _writer(path)
    w2.load_state_dict(sd)
    for t in range(10, 20):
        w2.write_step(t, *data[t])
    w2.close()
    value, count = np.zeros((100, 2)), np.zeros(100, np.int64)
    for ids, sc in data[:20]:
        np.add.at(value, ids, sc.astype(np.float32).astype(np.float64))
        np.add.at(count, ids, 1)
    s = open_scores(path)
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)
    raw = zarr.open_group(str(path), mode="r")
    assert (raw["sample_id"][20:] == -1).all()  # stale steps were cleared from disk too
    assert s.step_log.sizes["step"] == 20


def test_reduce_blocks_and_processes_agree_with_numpy(tmp_path):
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(7)
    n = 3000
    value, count = np.zeros((n, 2)), np.zeros(n, np.int64)
    with ScoreWriter(path, run_id="r", config={}, targets=["a", "b"], num_samples=n,
                     slots_per_rank=64, steps_per_chunk=8, max_steps=128, total_chunk_rows=256,
                     reduce_on_close=False) as w:
        for t in range(100):
            ids = rng.choice(n, 64, replace=False)
            sc = rng.standard_normal((64, 2)).astype(np.float32)
            w.write_step(t, ids, sc)
            np.add.at(value, ids, sc.astype(np.float64))
            np.add.at(count, ids, 1)
    # a tiny memory budget forces several sample blocks; 2 worker processes
    out = reduce_store(path, processes=2, memory_bytes=256 * 40 * 2)
    assert out["blocks"] >= 6 and out["workers"] == 2 and out["scores"] == 100 * 64 * 2
    s = open_scores(path)
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)
    assert not list(tmp_path.glob(".*reduce*"))  # spill removed


def test_readable_with_plain_zarr_and_xarray_without_shardshap(tmp_path):
    path = tmp_path / "s.zarr"
    with _writer(path) as w:
        w.write_step(0, [5, 6], [[1.0, 2.0], [3.0, 4.0]], [0.1, 0.2], lr=0.01)
        w.write_step(1, [5], [[10.0, 20.0]])
    code = f"""
import sys, json, warnings
warnings.simplefilter("error")
import numpy as np, xarray as xr, zarr
g = zarr.open_group({str(path)!r}, mode="r")
assert g.attrs["format"] == "shardshap.scores"
assert g["value"][5].tolist() == [11.0, 22.0] and int(g["count"][5]) == 2
ds = xr.open_zarr({str(path)!r}, consolidated=False)
assert ds["score"].dims == ("step", "slot", "target")
assert ds["value"].dims == ("sample", "target") and list(ds["target"].values) == ["a", "b"]
assert float(ds["score"].isel(step=1, slot=0, target=1)) == 20.0
assert float(ds["lr"].isel(step=0)) == 0.01 and np.isnan(float(ds["lr"].isel(step=2)))
assert float(ds["value"].sum()) == 40.0
assert not any(m == "shardshap" or m.startswith("shardshap.") for m in sys.modules), "imported"
# never pickled: only standard numeric/string dtypes and no pickle codec anywhere
for name, arr in g.arrays():
    meta = json.loads(open({str(path)!r} + "/" + name + "/zarr.json").read())
    assert "pickle" not in json.dumps(meta).lower(), name
    assert arr.dtype.kind in "iufU" or str(arr.dtype).startswith("StringDType"), (name, arr.dtype)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------- several processes
def _check_totals_and_log(path, world, steps):
    value, count = sw.expected_totals(world, steps)
    s = open_scores(path)
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)
    assert s.committed_steps.tolist() == [steps - 1] * world
    for r in range(world):  # every score in its rank's columns exactly once, nothing else
        ids, sc = _rank_log(path, r)
        for t in range(steps):
            eids, esc, _ = sw.step_data(r, t)
            b = len(eids)
            np.testing.assert_array_equal(ids[t, :b], eids)
            np.testing.assert_array_equal(sc[t, :b], esc)
            assert (ids[t, b:] == -1).all()
        assert (ids[steps:] == -1).all()
    assert not list(Path(path).rglob("*.partial"))


@pytest.mark.dist
def test_four_processes_write_one_store_concurrently(tmp_path):
    path = tmp_path / "s.zarr"
    codes = _launch(path, 4, "--steps", 30)
    assert codes == [0, 0, 0, 0]
    _check_totals_and_log(path, 4, 30)
    s = open_scores(path)
    assert s.attrs["world_size"] == 4 and s.attrs["metadata"] == {"mode": "exact"}
    assert s.attrs["max_global_batch"] == 4 * sw.SPR


@pytest.mark.dist
@pytest.mark.parametrize("resume_via", ["arg", "state"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, resume_via):
    """Every rank is SIGKILLed at a different step (after different checkpoints, chunks possibly
    mid-write); the job restarts from the last checkpoint all ranks completed."""
    path = tmp_path / "s.zarr"
    world, steps, flush_every = 3, 40, 10
    init = f"tcp://127.0.0.1:{free_port()}"
    die_at = [17, 26, 34]  # last checkpoints: after steps 9, 19, 29
    procs = [subprocess.Popen([sys.executable, WORKER, str(path), "--rank", str(r), "--world",
                               str(world), "--init", init, "--steps", str(steps),
                               "--flush-every", str(flush_every), "--die-at", str(die_at[r])], env=ENV)
             for r in range(world)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [-9, -9, -9]
    s = open_scores(path)
    assert s.committed_steps.tolist() == [9, 19, 29]  # what flush recorded before each kill
    raw = zarr.open_group(str(path), mode="r")
    beyond = [(_rank_log(path, r)[0][last + 1:] >= 0).any() for r, last in enumerate([9, 19, 29])]
    assert all(beyond), "the scenario needs unflushed chunks on disk beyond each committed step"
    assert (raw["written_step"][:] > [9, 19, 29]).all()
    with pytest.raises(StaleTotalsError):
        s.value  # noqa: B018  (reading the totals raises)
    # reducing the crashed store counts exactly the flushed steps of each rank, not what lies beyond
    reduce_store(path, processes=1)
    value, count = np.zeros((sw.N, sw.K)), np.zeros(sw.N, np.int64)
    for r, last in enumerate([9, 19, 29]):
        for t in range(last + 1):
            ids, sc, _ = sw.step_data(r, t)
            np.add.at(value, ids, sc.astype(np.float64))
            np.add.at(count, ids, 1)
    s = open_scores(path)
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)
    resume = min(json.loads((tmp_path / f"ckpt_rank{r}.json").read_text())["next_step"]
                 for r in range(world))
    assert resume == 10
    (path / "sample_id" / "c" / "0" / "0.deadbeef.partial").write_bytes(b"orphan")
    # the restarted job is killed again before its first flush: steps >= resume must not count
    codes = _launch(path, world, "--steps", steps, "--flush-every", flush_every,
                    "--resume-step", resume, "--resume-via", resume_via, "--die-at", 14)
    assert codes == [-9] * world
    assert open_scores(path).committed_steps.tolist() == [resume - 1] * world
    codes = _launch(path, world, "--steps", steps, "--flush-every", flush_every,
                    "--resume-step", resume, "--resume-via", resume_via)
    assert codes == [0] * world
    _check_totals_and_log(path, world, steps)


@pytest.mark.dist
def test_mpiexec_writers_and_mpi_reduce(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec (pip install mpi4py mpich) not available")
    path = tmp_path / "s.zarr"
    r = subprocess.run([str(mpiexec), "-n", "2", sys.executable, WORKER, str(path), "--barrier",
                        "mpi", "--steps", "25"], timeout=120, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    _check_totals_and_log(path, 2, 25)
    # wipe the totals, rebuild them with 2 MPI ranks
    g = zarr.open_group(str(path), mode="r+")
    g["value"][:] = np.nan
    g["count"][:] = 0
    code = "from shardshap.store import reduce_store; print(reduce_store(%r))" % str(path)
    r = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", code], timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("'workers': 2") == 2
    _check_totals_and_log(path, 2, 25)
