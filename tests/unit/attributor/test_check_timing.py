"""Config.check_timing='next-step': the same values, training and store as 'before-step', no host read of a
device value in the step, and a failed check raises at the next step, before that one trains."""
import copy

import numpy as np
import pytest
import torch
import zarr

import shardshap
from shardshap import Config
from shardshap.errors import AttributionError
from shardshap.store import open_scores
from shardshap.testing import cases

N = 1797  # the digits data set


def run(tmp_path, timing, steps=4, schedule="cached", bad_target_at=None):
    """Attributed steps (store in tmp_path/<timing>.zarr); per step the result or the error raised."""
    case = cases.digits_mlp(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    cfg = Config(num_samples=N, max_grad_norm=0.05, check_timing=timing, schedule=schedule, cold_steps=1)
    path = str(tmp_path / f"{timing}.zarr")
    out, params = [], []
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, cfg, store=path) as attr:
        for s in range(steps):
            b, ids = case.batches(s)
            if s == bad_target_at:
                attr.target_loss = lambda m, t: case.target_loss(m, t) * float("inf")
            try:
                out.append(attr.step(b, ids, None))
            except AttributionError as err:
                out.append(err)
            attr.target_loss = case.target_loss
            params.append([p.detach().clone() for p in case.model.parameters()])
    return out, params, copy.deepcopy(opt.state_dict()), path


@pytest.mark.parametrize("schedule", ["cached", "streaming"])
def test_next_step_checks_change_nothing_but_when_they_are_read(tmp_path, schedule):
    late, late_params, late_opt, late_path = run(tmp_path, "next-step", schedule=schedule)
    now, now_params, now_opt, now_path = run(tmp_path, "before-step", schedule=schedule)
    for a, b in zip(late, now):
        assert torch.equal(a.scores, b.scores)
        assert torch.is_tensor(a.clip_factor) and isinstance(b.clip_factor, float)
        assert float(a.clip_factor) == b.clip_factor
        for name, e in b.metadata.get("sketch_energy", {}).items():
            assert float(a.metadata["sketch_energy"][name]) == e
    assert min(b.clip_factor for b in now) < 1.0  # (the case clips)
    for p, q in zip(late_params[-1], now_params[-1]):
        assert torch.equal(p, q), "training differs"
    late_store, now_store = open_scores(late_path), open_scores(now_path)
    np.testing.assert_array_equal(late_store.value, now_store.value)
    np.testing.assert_array_equal(late_store.count, now_store.count)
    for name in ("loss", "target_loss", "lr"):
        np.testing.assert_array_equal(late_store.step_log[name].values, now_store.step_log[name].values)


def test_a_failed_check_refuses_the_next_step(tmp_path):
    out, params, _, path = run(tmp_path, "next-step", steps=4, bad_target_at=1)
    reference, ref_params, _, _ = run(tmp_path, "before-step", steps=2)
    assert out[1].step == 1  # step 1 trained, as a step with a finite target does (its check is read at step 2)
    assert all(torch.equal(p, q) for p, q in zip(params[1], ref_params[1]))
    assert not all(torch.equal(p, q) for p, q in zip(params[0], params[1]))
    assert isinstance(out[2], AttributionError)  # ... and step 2 was refused before it trained
    assert "target_loss is not finite" in str(out[2]) and "step 1" in str(out[2])
    assert "check_timing='next-step'" in str(out[2])
    assert all(torch.equal(p, q) for p, q in zip(params[1], params[2])), "the refused step trained"
    assert out[3].step == 2  # the refused step was not counted
    g = zarr.open_group(path, mode="r")
    written = np.asarray(g["sample_id"][:])
    assert (written[1] == -1).all(), "the failed step's values reached the store"
    assert (written[0] >= 0).all() and (written[2] >= 0).all()
    np.testing.assert_array_equal(open_scores(path).step_log["loss"].values[0],
                                  float(reference[0].loss))


def test_close_reads_the_last_steps_checks(tmp_path):
    case = cases.digits_mlp(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    attr = shardshap.Attributor(case.model, opt, case.train_loss,
                                lambda m, t: case.target_loss(m, t) * float("inf"),
                                Config(num_samples=N, check_timing="next-step"), store=str(tmp_path / "s.zarr"))
    attr.step(*case.batches(0), None)
    with pytest.raises(AttributionError, match="target_loss is not finite.*step 0"):
        attr.close()


def test_the_step_reads_no_device_value(monkeypatch):
    """No aten._local_scalar_dense (what .item(), float(t) and bool(t) dispatch) and no tolist() of a float
    tensor in a warm step with next-step checks, one with before-step checks (benchmarks/launches.py counts
    the same way)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_local_scalar_dense" and id(args[0]) not in steps:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        Reads.count += t.is_floating_point()
        return tolist(t)

    case = cases.digits_mlp(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2, foreach=True)
    for timing, expected in (("next-step", 0), ("before-step", 1)):
        model, o = copy.deepcopy((case.model, opt))
        with shardshap.Attributor(model, o, case.train_loss, case.target_loss,
                                  Config(max_grad_norm=1.0, check_timing=timing, cold_steps=1)) as attr:
            for s in range(3):
                attr.step(*case.batches(s), None)
            steps = {id(st["step"]) for st in o.state.values()}  # (CPU scalars on a GPU too)
            Reads.count = 0
            with Reads(), monkeypatch.context() as patch:
                patch.setattr(torch.Tensor, "tolist", counted_tolist)
                attr.step(*case.batches(3), None)
        assert Reads.count == expected, timing


def test_a_failed_optimizer_step_leaves_no_pending_row(tmp_path, monkeypatch):
    """Next-step checks: a step whose optimizer step raises did not train, so its row never reaches the store
    (the retried step takes its index)."""
    case = cases.digits_mlp(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    path = str(tmp_path / "s.zarr")
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss,
                              Config(num_samples=N, check_timing="next-step"), store=path) as attr:
        attr.step(*case.batches(0), None)
        real = opt.step
        monkeypatch.setattr(opt, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
        with pytest.raises(RuntimeError, match="device lost"):
            attr.step(*case.batches(5), None)
        monkeypatch.setattr(opt, "step", real)
        b, ids = case.batches(1)
        retried = attr.step(b, ids, None)
    assert retried.step == 1
    g = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(np.sort(np.asarray(g["sample_id"][1])), np.sort(ids.numpy()))
    assert sorted(open_scores(path).step_log.step.values.tolist()) == [0, 1]
