"""The Attributor streaming to a store: totals equal the returned values, a restart from a checkpoint
gives the totals of an uninterrupted run, bad ids change nothing."""
import copy

import numpy as np
import pytest
import torch

import shardshap
from shardshap.store import open_scores
from shardshap.testing import cases

N = 1797  # the digits data set; the case's sample ids index it
CFG = dict(num_samples=N, target_names=["even", "odd"], max_grad_norm=1.0)


def make():
    case = cases.digits_mlp(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    return case, opt


def test_values_stream_to_the_store(tmp_path):
    case, opt = make()
    expected, count = np.zeros((N, 2)), np.zeros(N, dtype=int)
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, shardshap.Config(**CFG),
                              store=str(tmp_path / "run.zarr")) as attr:
        for s in range(6):
            b, ids = case.batches(s)
            out = attr.step(b, ids, None)
            np.add.at(expected, ids.numpy(), out.scores.double().numpy())
            np.add.at(count, ids.numpy(), 1)
    scores = open_scores(str(tmp_path / "run.zarr"))
    assert scores.targets == ["even", "odd"]
    np.testing.assert_allclose(scores.value, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(scores.count, count)
    assert scores.attrs["metadata"]["estimator"] == "secant"
    assert int(scores.step_log.sizes["step"]) >= 6


def test_restart_from_checkpoint_equals_uninterrupted_run(tmp_path):
    case, opt = make()
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, shardshap.Config(**CFG),
                              store=str(tmp_path / "a.zarr")) as attr:
        for s in range(6):
            attr.step(*case.batches(s), None)
    reference = open_scores(str(tmp_path / "a.zarr"))

    case, opt = make()
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, shardshap.Config(**CFG),
                                store=str(tmp_path / "b.zarr"))
    for s in range(3):
        attr.step(*case.batches(s), None)
    checkpoint = copy.deepcopy((case.model.state_dict(), opt.state_dict(), attr.state_dict()))
    for s in range(3, 5):  # progress after the checkpoint that the "crash" loses (steps 3, 4 were written)
        attr.step(*case.batches(s), None)
    attr._writer.flush()
    attr.capture.remove()  # the process dies here: no close

    case, opt = make()
    model_sd, opt_sd, attr_sd = checkpoint
    case.model.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)
    with shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, shardshap.Config(**CFG),
                              store=str(tmp_path / "b.zarr")) as attr:
        attr.load_state_dict(attr_sd)
        for s in range(3, 6):
            attr.step(*case.batches(s), None)
    resumed = open_scores(str(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(resumed.count, reference.count)
    np.testing.assert_allclose(resumed.value, reference.value, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("bad", ["out-of-range", "duplicate"])
def test_bad_ids_change_nothing(tmp_path, bad):
    case, opt = make()
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, shardshap.Config(**CFG),
                                store=str(tmp_path / "run.zarr"))
    attr.step(*case.batches(0), None)
    before = [p.detach().clone() for p in case.model.parameters()]
    b, ids = case.batches(1)
    ids = ids.clone()
    ids[0] = N + 5 if bad == "out-of-range" else ids[1]
    with pytest.raises(shardshap.AttributionError, match="outside" if bad == "out-of-range" else "duplicates"):
        attr.step(b, ids, None)
    assert all(torch.equal(p, q) for p, q in zip(case.model.parameters(), before))
    attr.close()
    scores = open_scores(str(tmp_path / "run.zarr"))
    assert scores.count.sum() == 8  # only step 0


def test_store_needs_num_samples(tmp_path):
    case, opt = make()
    with pytest.raises(shardshap.AttributionError, match="num_samples"):
        shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss, store=str(tmp_path / "x.zarr"))
