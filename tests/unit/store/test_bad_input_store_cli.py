"""Bad input to the store and the CLI: each case raises the right ShardshapError subclass (library) or
exits with the right code and a one-line message naming the problem and the fix (CLI), and leaves an
existing store exactly as it was (arrays and attributes read with plain zarr, and its file names)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from shardshap import cli
from shardshap.errors import (
    ShardshapError,
    StaleTotalsError,
    StoreClosedError,
    StoreError,
    StoreFormatError,
    StoreMismatchError,
    StoreWriteError,
)
from shardshap.store import ScoreWriter, open_scores

N = 20
ARGS = dict(run_id="r1", config={"lr": 0.1}, targets=["a", "b"], num_samples=N, slots_per_rank=3,
            steps_per_chunk=2, max_steps=8, reduce_on_close=False)


def _writer(path, **kw):
    return ScoreWriter(path, **{**ARGS, **kw})


def _store(path, close=True):
    """A small store of 3 steps (totals current when closed)."""
    w = _writer(path, reduce_on_close=close)
    for t in range(3):
        w.write_step(t, [t, t + 1], np.full((2, 2), t + 0.5, np.float32), [1.0, 2.0])
    w.close() if close else w.flush()
    return path


def snapshot(path):
    """Everything a failed call must leave alone: file names, attributes, every array's contents."""
    path = str(path)
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    g = zarr.open_group(path, mode="r")
    return files, g.attrs.asdict(), {name: g[name][:] for name in sorted(g.array_keys())}


def assert_unchanged(before, after):
    assert before[0] == after[0] and before[1] == after[1]
    assert before[2].keys() == after[2].keys()
    for name in before[2]:
        np.testing.assert_array_equal(before[2][name], after[2][name], err_msg=name)  # NaN == NaN here


# ---------------------------------------------------------------------------- ScoreWriter arguments
@pytest.mark.parametrize("kw, error, match", [
    (dict(targets="ab"), StoreError, "list of names"),
    (dict(targets=["a", "a"]), StoreError, "distinct"),
    (dict(targets=[]), StoreError, "non-empty"),
    (dict(num_samples=0), StoreError, "num_samples must be positive"),
    (dict(num_samples=2.5), StoreError, "num_samples must be an integer"),
    (dict(num_samples=None), StoreError, "num_samples must be an integer"),
    (dict(slots_per_rank=0), StoreError, "slots_per_rank must be positive"),
    (dict(max_steps=0), StoreError, "must be positive"),
    (dict(total_chunk_rows=0), StoreError, "must be positive"),
    (dict(run_id=""), StoreError, "run_id"),
    (dict(world_size=2), StoreError, "barrier"),
    (dict(world_size=2, rank=2, barrier=lambda: None), StoreError, "outside world_size"),
    (dict(config={"f": object()}), StoreError, "JSON-serialisable"),
    (dict(resume_step=-1), StoreError, "resume_step -1 outside"),
    (dict(resume_step="3"), StoreError, "resume_step must be an integer"),
])
def test_writer_arguments_rejected_before_the_store_is_touched(tmp_path, kw, error, match):
    path = tmp_path / "s.zarr"
    with pytest.raises(error, match=match):
        _writer(path, **kw)
    assert not path.exists()


@pytest.mark.parametrize("kw, error, match", [
    (dict(run_id="other"), StoreMismatchError, "run_id is 'r1', this writer has 'other'.*overwrite=True"),
    (dict(num_samples=N + 1), StoreMismatchError, "num_samples"),
    (dict(targets=["a", "c"]), StoreMismatchError, "targets"),
    (dict(resume_step=99), StoreError, "outside"),
])
def test_writer_refuses_an_existing_store_and_leaves_it_alone(tmp_path, kw, error, match):
    path = _store(tmp_path / "s.zarr")
    before = snapshot(path)
    with pytest.raises(error, match=match):
        _writer(path, **kw)
    assert_unchanged(before, snapshot(path))
    assert open_scores(path).totals_current


@pytest.mark.parametrize("overwrite", [False, True])
def test_writer_on_an_existing_file_names_the_path_and_keeps_the_file(tmp_path, overwrite):
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    with pytest.raises(StoreError, match="notes.txt.*is an existing file.*pass a new path"):
        _writer(path, overwrite=overwrite)
    assert path.read_text() == "precious"


def test_writer_on_a_directory_that_is_not_a_store(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="data.*does not look like a score store.*new or empty directory"):
        _writer(d)
    assert sorted(os.listdir(d)) == ["precious.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _store(empty)  # an empty directory is as good as a new path
    assert open_scores(empty).count.sum() == 6


def test_writer_under_a_file_is_a_store_write_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreWriteError, match="cannot create the store.*parent directory"):
        _writer(tmp_path / "f" / "s.zarr")
    assert (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------------------- write_step, retract, resume
@pytest.mark.parametrize("call, error, match", [
    (lambda w: w.write_step("x", [1], [[1.0, 1.0]]), StoreError, "step must be an integer"),
    (lambda w: w.write_step(3.5, [1], [[1.0, 1.0]]), StoreError, "step must be an integer"),
    (lambda w: w.write_step(3, [1], [["a", "b"]]), StoreError, "scores must be numbers"),
    (lambda w: w.write_step(3, [[1, 2]], np.ones((2, 2))), StoreError, "1-D"),
    (lambda w: w.write_step(3, [1], [[1.0, 1.0]], sample_loss=[{}]), StoreError, "sample_loss must be numbers"),
    (lambda w: w.write_step(2, [1], [[1.0, 1.0]]), StoreError, "increase"),
    (lambda w: w.retract(1), StoreError, "only the last written step"),
    (lambda w: w.load_state_dict({"run_id": "r1", "next_step": 1}), StoreError, "before the first write_step"),
    (lambda w: w.load_state_dict({"run_id": "other", "next_step": 1}), StoreError, "of run 'other'"),
    (lambda w: w.load_state_dict({"run_id": "r1"}), StoreError, "'next_step'"),
    (lambda w: w.load_state_dict([1]), StoreError, "state_dict"),
    (lambda w: w.load_state_dict({"run_id": "r1", "world_size": 4, "next_step": 1}), StoreError, "world_size"),
])
def test_bad_writer_calls_change_nothing(tmp_path, call, error, match):
    path = tmp_path / "s.zarr"
    w = _writer(path)
    w.write_step(2, [5, 6], np.ones((2, 2)))
    w.flush()
    before = snapshot(path)
    with pytest.raises(error, match=match):
        call(w)
    assert w.flush() == 2  # nothing of the failed call was buffered either
    assert_unchanged(before, snapshot(path))
    w.close()


def test_closed_writer(tmp_path):
    w = _writer(tmp_path / "s.zarr")
    w.close()
    for call in (lambda: w.write_step(0, [1], [[1.0, 1.0]]), w.flush, w.check_healthy):
        with pytest.raises(StoreClosedError, match="closed"):
            call()


# ---------------------------------------------------------------------------- open_scores
def _plain_group(p):
    zarr.open_group(str(p), mode="w", attributes={"format": "other"})


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is a file, not a shardshap score store"),
    (lambda p: p.mkdir(), "no zarr.json"),
    (_plain_group, "not a shardshap score store"),
])
def test_open_scores_on_bad_paths(tmp_path, make, match):
    p = tmp_path / "x.zarr"
    make(p)
    with pytest.raises(StoreFormatError, match=match):
        open_scores(p)


def test_open_scores_needs_a_path():
    with pytest.raises(StoreError, match="str or os.PathLike"):
        open_scores(None)


def test_stale_totals_name_reduce(tmp_path):
    path = _store(tmp_path / "s.zarr", close=False)
    before = snapshot(path)
    with pytest.raises(StaleTotalsError, match="reduce"):
        open_scores(path).value  # noqa: B018  (the access raises)
    assert_unchanged(before, snapshot(path))


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture
def store(tmp_path):
    path = _store(tmp_path / "run.zarr")
    with open(str(path) + ".manifest.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": i, "domain": "d"}) + "\n")
    return str(path)


def _bad_manifest(tmp_path, content: bytes):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    return str(p)


# (argv, exit code, what the message must say: the problem and the fix)
CASES = [
    (["top", "{store}", "-k", "-5"], 2, ["-k -5", "positive integer", "e.g. -k 10"]),
    (["top", "{store}", "-k", "0"], 2, ["-k 0", "positive integer"]),
    (["report", "{store}", "-k", "0"], 2, ["-k 0", "positive integer"]),
    (["select", "{store}", "--rule", "drop-lowest", "--fraction", "1.5", "-o", "{tmp}/k.txt"], 2,
     ["--fraction 1.5", "in (0, 1)", "e.g. --fraction 0.1"]),
    (["select", "{store}", "--rule", "drop-lowest", "--fraction", "0", "-o", "{tmp}/k.txt"], 2, ["--fraction 0"]),
    (["select", "{store}", "--rule", "drop-negative", "--fraction", "nan", "-o", "{tmp}/k.txt"], 2,
     ["--fraction nan"]),
    (["reduce", "{store}", "--processes", "0"], 2, ["--processes 0", "at least 1"]),
    (["verify", "--config", "{tmp}/none.yaml", "--batch", "40"], 2, ["--batch 40", "[2, 16]"]),
    (["verify", "--config", "{tmp}/none.yaml", "--checks", "0"], 2, ["--checks 0", "at least 1"]),
    (["info", "{tmp}/missing.zarr"], 1, ["no store at", "check the path"]),
    (["info", "{store}.manifest.jsonl"], 1, ["not a readable shardshap store", "is a file", "store directory"]),
    (["report", "{tmp}"], 1, ["not a readable shardshap store", "no zarr.json"]),
    (["top", "{store}", "--target", "nope"], 1, ["--target 'nope' is not a target", "targets: a, b"]),
    (["report", "{store}", "--manifest", "{tmp}/none.jsonl"], 1, ["no manifest at", "pass --manifest"]),
    (["report", "{store}", "--manifest", "BAD:{\"id\": 1}\nnot json\n"], 1, ["bad.jsonl:2", "expected"]),
    (["top", "{store}", "--manifest", "BAD:{\"id\": 99}\n"], 1, ["bad.jsonl:1", "outside the store's [0, 20)"]),
    (["report", "{store}", "--manifest", "BAD:\xff\xfe\n"], 1, ["not UTF-8", "pass the JSONL manifest"]),
    (["report", "{store}", "--manifest", "{tmp}"], 1, ["not a file", "JSONL"]),
    (["select", "{store}", "--rule", "drop-negative", "-o", "{tmp}/no/dir/k.txt"], 1,
     ["cannot write", "existing, writable directory"]),
    (["plot", "{store}", "-o", "{store}.manifest.jsonl"], 1, ["cannot create the folder", "pass -o"]),
]


@pytest.mark.parametrize("argv, code, says", CASES, ids=[" ".join(c[0][:1] + c[0][2:4]) for c in CASES])
def test_cli_bad_input_is_one_line_with_the_fix(store, tmp_path, capsys, argv, code, says):
    tmp = tmp_path / "work"
    tmp.mkdir()
    argv = [_bad_manifest(tmp, a[4:].encode("latin-1")) if a.startswith("BAD:") else a.format(store=store, tmp=tmp)
            for a in argv]
    before = snapshot(store)
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"shardshap {argv[0]}: error: "), err
    for s in says:
        assert s in err, (s, err)
    assert_unchanged(before, snapshot(store))


def test_cli_stale_totals_names_reduce(tmp_path, capsys):
    path = str(_store(tmp_path / "s.zarr", close=False))
    before = snapshot(path)
    assert cli.main(["report", path]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and f"'shardshap reduce {path}' first" in err
    assert_unchanged(before, snapshot(path))
    assert cli.main(["reduce", path, "--processes", "1"]) == 0 and open_scores(path).totals_current


def test_cli_reports_a_bug_as_a_bug_not_as_a_bad_store(store, capsys, monkeypatch):
    """A KeyError inside the reader is a defect of shardshap, not 'not a readable store' (review D18)."""
    def broken(path):
        raise KeyError("internal")

    monkeypatch.setattr("shardshap.store.open_scores", broken)
    assert cli.main(["info", store]) == 1
    err = capsys.readouterr().err
    assert "KeyError" in err and "--debug" in err and "not a readable" not in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "info", store])
    assert not issubclass(KeyError, ShardshapError)
