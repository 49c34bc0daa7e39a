"""The `shardshap` CLI on a store written by a real attributed run (digits MLP with a label-noise 'junk'
domain): numbers checked against values accumulated independently from the run's step results."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import shardshap
from shardshap import cli
from shardshap.analysis import auroc
from shardshap.analysis.manifest import default_path, write_manifest
from shardshap.testing import cases

N = 1797


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    case = cases.digits_mlp(batch_size=16, dtype=torch.float32)
    store = str(tmp / "run.zarr")
    junk = set(range(0, N, 7))  # every 7th sample gets a wrong label: the 'junk' domain
    X, y = case.batches(0)[0]
    train_loss = case.train_loss

    def noisy_loss(m, b):
        x, t, ids = b
        t = torch.where(torch.tensor([i in junk for i in ids.tolist()]), (t + 3) % 10, t)
        return train_loss(m, (x, t))

    write_manifest(default_path(store), range(N), ["junk" if i in junk else ("low" if i % 2 else "high")
                                                   for i in range(N)], [f"sample {i}" for i in range(N)])
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    total = np.zeros((N, 2))
    with shardshap.Attributor(case.model, opt, noisy_loss, case.target_loss,
                              shardshap.Config(num_samples=N, target_names=["a", "b"]), store=store) as attr:
        for s in range(30):
            (x, t), ids = case.batches(s)
            out = attr.step((x, t, ids), ids, None)
            np.add.at(total, ids.numpy(), out.scores.double().numpy())
    return store, total, junk


def run_cli(*argv, capsys):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_json(run, capsys):
    store, total, junk = run
    code, out, _ = run_cli("report", store, "--json", capsys=capsys)
    assert code == 0
    rep = json.loads(out)
    seen = np.flatnonzero(np.abs(total).sum(1) > 0)
    assert rep["samples_seen"] == len(seen) and rep["steps"] == 30
    assert set(rep["per_domain"]) == {"junk", "low", "high"}
    is_junk = np.array([i in junk for i in seen])
    assert rep["auroc_low_value_is_junk"]["sum"] == pytest.approx(auroc(total[seen].sum(1), is_junk), abs=1e-6)
    assert rep["bottom"][0]["id"] == int(seen[np.argmin(total[seen].sum(1))])
    assert rep["top"][0]["text"] == f"sample {rep['top'][0]['id']}"


def test_auroc_against_pair_counting():
    rng = np.random.default_rng(0)
    score, pos = rng.normal(size=50), rng.random(50) < 0.3
    pairs = [(a < b) + 0.5 * (a == b) for a in score[pos] for b in score[~pos]]
    assert auroc(score, pos) == pytest.approx(np.mean(pairs))


def test_top_select_plot(run, capsys, tmp_path):
    store, total, _ = run
    code, out, _ = run_cli("top", store, "-k", "3", "--bottom", "--target", "b", "--json", capsys=capsys)
    seen = np.flatnonzero(np.abs(total).sum(1) > 0)
    assert [r["id"] for r in json.loads(out)] == seen[np.argsort(total[seen, 1])[:3]].tolist()
    keep = tmp_path / "keep.txt"
    assert run_cli("select", store, "--rule", "drop-negative", "-o", str(keep), capsys=capsys)[0] == 0
    expected = sorted(set(range(N)) - set(seen[total[seen].sum(1) < 0].tolist()))
    assert np.loadtxt(keep, dtype=int).tolist() == expected
    code, out, _ = run_cli("plot", store, "-o", str(tmp_path / "plots"), "--json", capsys=capsys)
    for path in json.loads(out):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert run_cli("info", store, "--json", capsys=capsys)[0] == 0


@pytest.mark.parametrize("argv, message, code", [  # code 2: a bad flag value; 1: what it points at is wrong
    (["info", "/nonexistent/run.zarr"], "no store at", 1),
    (["top", "STORE", "--target", "nope"], "--target 'nope' is not a target", 1),
    (["select", "STORE", "--rule", "drop-lowest", "--fraction", "2", "-o", "/tmp/x.txt"], "must be in (0, 1)", 2),
    (["report", "STORE", "--manifest", "/nonexistent.jsonl"], "no manifest at", 1),
])
def test_errors_are_one_line(run, argv, message, code):
    store, _, _ = run
    argv = [a.replace("STORE", store) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "shardshap.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == code
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_steps_window_rebuilds_totals_from_the_log(run, capsys, tmp_path):
    """--steps A:B values the samples over those steps only (checked against the xarray step log), leaves the
    stored totals alone, and a window outside the log is a clear error."""
    store, total, _ = run
    log = shardshap.open_scores(store).step_log.sel(step=slice(10, 29))
    ids, score = log["sample_id"].values.reshape(-1), log["score"].values.reshape(-1, 2)
    expected = np.zeros((N, 2))
    np.add.at(expected, ids[ids >= 0], score[ids >= 0])
    code, out, _ = run_cli("top", store, "--steps", "10:", "-k", "5", "--json", capsys=capsys)
    assert code == 0
    rows = json.loads(out)
    order = np.argsort(-expected.sum(1), kind="stable")[:5]
    assert [r["id"] for r in rows] == order.tolist()
    assert [r["value"] for r in rows] == pytest.approx(expected.sum(1)[order].tolist(), rel=1e-6)
    code, out, _ = run_cli("report", store, "--steps", "10:30", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["steps"] == 20 and json.loads(out)["step_window"] == [10, 30]
    np.testing.assert_allclose(shardshap.open_scores(store).value, total, rtol=1e-5, atol=1e-7)  # untouched
    code, _, err = run_cli("top", store, "--steps", "40:50", capsys=capsys)
    assert code != 0 and "starts after the log, which has 30 committed steps" in err
    code, _, err = run_cli("select", store, "--steps", "ten", "--rule", "drop-negative", "-o",
                           str(tmp_path / "k.txt"), capsys=capsys)
    assert code != 0 and "give a window of steps A:B" in err
