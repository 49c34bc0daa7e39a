"""Fault injection: a full disk under the writer thread, the same under the Attributor, durable flushes
(fsync), and a crashed rank's stale rows in report/plot. Expectations are numpy sums of the data that was
written (or of the Attributor's step results), never the store's own output."""

from __future__ import annotations

import copy
import errno
import json
import os

import numpy as np
import pytest
import torch
import zarr

import shardshap
from shardshap import cli
from shardshap.analysis.plots import per_step_domain_values
from shardshap.analysis.report import build_report, mean_sample_loss
from shardshap.errors import StoreWriteError
from shardshap.store import ScoreWriter, open_scores
from shardshap.testing import cases

N, K, SPR, C = 50, 2, 4, 4  # samples, targets, slots per rank, steps per chunk


def _writer(path, **kw):
    args = dict(run_id="r", config={}, targets=["a", "b"][:K], num_samples=N, slots_per_rank=SPR,
                steps_per_chunk=C, max_steps=64, reduce_on_close=False)
    args.update(kw)
    return ScoreWriter(path, **args)


def _data(step, rank=0, loss_offset=0.0):
    """(ids, scores, sample_loss) of one step: a pure function of its arguments."""
    rng = np.random.default_rng([rank, step])
    b = int(rng.integers(1, SPR + 1))
    ids = rng.choice(N, b, replace=False)
    return ids, rng.standard_normal((b, K)).astype(np.float32), (rng.random(b) + loss_offset).astype(np.float32)


def _totals(steps_by_rank):
    """numpy totals of the given steps, {rank: steps}."""
    value, count = np.zeros((N, K)), np.zeros(N, np.int64)
    for rank, steps in steps_by_rank.items():
        for t in steps:
            ids, sc, _ = _data(t, rank)
            np.add.at(value, ids, sc.astype(np.float64))
            np.add.at(count, ids, 1)
    return value, count


class FullDisk:
    """Stands in for one zarr array of the writer: the first `ok` writes succeed, then the disk is full."""

    def __init__(self, arr, ok: int):
        self.arr, self.ok = arr, ok

    def __setitem__(self, idx, value):
        if self.ok <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.ok -= 1
        self.arr[idx] = value

    def __getitem__(self, idx):
        return self.arr[idx]

    def __getattr__(self, name):
        return getattr(self.arr, name)


# ---------------------------------------------------------------------------- a. writer thread
@pytest.mark.parametrize("array, ok", [
    ("score", 0),           # the first chunk row after the commit fails
    ("sample_id", 2),       # a later row fails half-written (its sample_id written, its score not)
    ("committed_step", 0),  # the disk fills up exactly when flush records the committed marker
])
def test_disk_full_is_a_store_write_error_and_committed_steps_stay_intact(tmp_path, array, ok):
    path = tmp_path / "s.zarr"
    w = _writer(path)
    for t in range(10):
        w.write_step(t, *_data(t))
    assert w.flush() == 9
    w._arrays[array] = FullDisk(w._arrays[array], ok)
    with pytest.raises(StoreWriteError, match="No space left on device") as ei:
        for t in range(10, 30):
            w.write_step(t, *_data(t))
            w._queue.join()  # the thread has written what it got: its error shows at the next call
        w.flush()
    assert isinstance(ei.value.__cause__, OSError) and ei.value.__cause__.errno == errno.ENOSPC
    assert isinstance(ei.value, OSError) and "intact" in str(ei.value) or "stay committed" in str(ei.value)
    with pytest.raises(StoreWriteError):  # the writer stays failed: nothing more is committed
        w.flush()
    with pytest.raises(StoreWriteError):
        w.close()

    assert zarr.open_group(str(path), mode="r")["committed_step"][:].tolist() == [9]
    s = open_scores(path)
    s.reduce(processes=1)
    value, count = _totals({0: range(10)})
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)
    assert s.step_log.sizes["step"] == 10


# ---------------------------------------------------------------------------- b. through the Attributor
def _state(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for p in oa["state"]:
        for k, v in oa["state"][p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][p][k])), (p, k)


@pytest.mark.parametrize("reported_by", ["flush", "step"])
def test_attributor_disk_full_raises_before_the_optimizer_steps(tmp_path, monkeypatch, reported_by):
    """Committed through step 3, then the disk fills up. 'flush': the failure happens when the next flush
    writes the buffered row (the Attributor's default chunks are far longer than this run), so flush raises
    and the next step raises before training. 'step': 2-step chunks, so the writer thread fails on its own
    on a full row; the next step raises before training."""
    if reported_by == "step":
        monkeypatch.setattr(shardshap.store.schema, "choose_steps_per_chunk", lambda *a, **k: 2)
    case = cases.digits_mlp(batch_size=6)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    path = tmp_path / "run.zarr"
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                                shardshap.Config(num_samples=1797), store=str(path))
    value, count = np.zeros((1797, 2)), np.zeros(1797, np.int64)
    for s in range(4):
        (x, y), ids = case.batches(s)
        out = attr.step((x, y), ids, None)
        np.add.at(value, ids.numpy(), out.scores.float().double().numpy())
        np.add.at(count, ids.numpy(), 1)
    attr.flush()
    writer = attr._writer
    assert writer.layout.steps_per_chunk == (2 if reported_by == "step" else writer.layout.steps_per_chunk)
    writer._arrays["score"] = FullDisk(writer._arrays["score"], 0)

    step = 4
    if reported_by == "flush":
        attr.step(case.batches(step)[0], case.batches(step)[1], None)  # buffered only: nothing written yet
        step += 1
        with pytest.raises(StoreWriteError, match="No space left on device"):
            attr.flush()
    else:
        for step in range(4, 7):  # step 6 opens a new row: row 2 (steps 4, 5) goes to the thread and fails
            attr.step(case.batches(step)[0], case.batches(step)[1], None)
        writer._queue.join()
        step = 7

    before = _state(case.model, opt)
    (x, y), ids = case.batches(step)
    with pytest.raises(shardshap.ShardshapError, match="No space left on device") as ei:
        attr.step((x, y), ids, None)
    assert isinstance(ei.value, StoreWriteError)
    _assert_same_state(before, _state(case.model, opt))
    assert attr.step_index == step
    assert all(p.grad is None or not p.grad.any() for p in case.model.parameters())
    with pytest.raises(StoreWriteError):
        attr.close()

    assert zarr.open_group(str(path), mode="r")["committed_step"][:].tolist() == [3]
    s = open_scores(path)
    s.reduce(processes=1)
    np.testing.assert_allclose(s.value, value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.count, count)


# ---------------------------------------------------------------------------- c. durable flush
@pytest.fixture
def fsyncs(monkeypatch):
    """Paths handed to os.fsync, in order (without syncing: the test needs no device)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the synced files")
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(os.readlink(f"/proc/self/fd/{fd}")))
    return calls


def _chunk_files(path, rows):
    """The chunk files of rank 0 at the given chunk rows, for every log array (those that exist)."""
    g = zarr.open_group(str(path), mode="r")
    out = set()
    for name in ("sample_id", "score", "sample_loss", "lr", "loss", "target_loss", "residual", "wall_time"):
        arr = g[name]
        for r in rows:
            f = os.path.join(str(path), name, arr.metadata.encode_chunk_key((r,) + (0,) * (arr.ndim - 1)))
            if os.path.exists(f):
                out.add(f)
    return out


def test_durable_flush_fsyncs_new_chunks_then_the_marker(tmp_path, fsyncs):
    path = (tmp_path / "s.zarr").resolve()
    marker = str(path / "committed_step" / "c" / "0")
    w = _writer(path)
    for t in range(6):
        w.write_step(t, *_data(t))
    w.flush()
    assert fsyncs == []  # a plain flush never syncs
    w.flush(durable=True)  # the first durable flush syncs the whole store: metadata too
    assert _chunk_files(path, [0, 1]) | {marker, str(path / "zarr.json")} <= set(fsyncs)
    assert all(p.startswith(str(path)) for p in fsyncs)

    fsyncs.clear()
    w.flush(durable=True)
    assert fsyncs == []  # nothing new was written

    for t in range(6, 10):  # row 1 is completed, row 2 (a new folder) is started
        w.write_step(t, *_data(t))
    w.flush(durable=True)
    files = [p for p in fsyncs if os.path.isfile(p)]
    new = _chunk_files(path, [1, 2])
    assert new and new <= set(files) and len(files) == len(set(files))  # each once
    assert not set(files) & _chunk_files(path, [0])  # row 0 did not change: not synced again
    assert set(files) <= new | {marker, str(path / "written_step" / "c" / "0")}
    assert str(path / "score" / "c") in fsyncs  # the entry of the new row's folder
    assert max(i for i, p in enumerate(fsyncs) if p in new) < fsyncs.index(marker)  # chunks, then marker

    fsyncs.clear()
    w.write_step(10, *_data(10))
    w.close()  # close flushes, but not durably
    assert fsyncs == []


# ---------------------------------------------------------------------------- a crashed rank in report/plot
def _two_rank_store_with_stale_rows(path):
    """Rank 0 committed steps 0..7; rank 1 committed 0..3, then wrote rows 4..7 (huge losses) that reached
    the disk without being committed before it died."""
    noop = lambda: None
    w0 = _writer(path, world_size=2, rank=0, barrier=noop)
    w1 = _writer(path, world_size=2, rank=1, barrier=noop)
    for t in range(8):
        w0.write_step(t, *_data(t, 0))
    w0.close()
    for t in range(4):
        w1.write_step(t, *_data(t, 1))
    w1.flush()
    for t in range(4, 9):
        w1.write_step(t, *_data(t, 1, loss_offset=1000.0))  # step 8 opens row 2: row 1 goes to disk
    w1._queue.join()
    raw = zarr.open_group(str(path), mode="r")
    assert raw["committed_step"][:].tolist() == [7, 3]
    assert (raw["sample_id"][4:8, SPR:] >= 0).any()  # the stale rows are really there
    open_scores(path).reduce(processes=1)


def test_report_and_plot_ignore_a_crashed_ranks_uncommitted_rows(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _two_rank_store_with_stale_rows(path)
    committed = {0: range(8), 1: range(4)}
    loss_sum, loss_n = np.zeros(N), np.zeros(N)
    per_step = np.zeros(8)
    for rank, steps in committed.items():
        for t in steps:
            ids, sc, loss = _data(t, rank)
            np.add.at(loss_sum, ids, loss.astype(np.float64))
            np.add.at(loss_n, ids, 1)
            per_step[t] += sc.astype(np.float64).sum()
    with np.errstate(invalid="ignore"):
        mean_loss = loss_sum / loss_n

    s = open_scores(path)
    np.testing.assert_allclose(mean_sample_loss(s), mean_loss, rtol=1e-6, equal_nan=True)
    rep = build_report(s, top=50)
    for row in rep["top"]:
        assert row["loss"] == pytest.approx(mean_loss[row["id"]], rel=1e-6)
    assert rep["steps"] == 8
    names, values = per_step_domain_values(s, None)
    assert names == ["all"]
    np.testing.assert_allclose(values[:, 0], per_step, rtol=1e-5, atol=1e-6)

    assert cli.main(["report", str(path), "--json", "-k", "50"]) == 0
    for row in json.loads(capsys.readouterr().out)["bottom"]:
        assert row["loss"] < 2  # the stale rows' losses are above 1000
