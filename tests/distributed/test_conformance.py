"""Every backend passes the same contract checks (shardshap/testing/conformance.py): owned ranges cover each
element once, gather(owned(x)) == x, the clip factor is torch's, target gradients leave .grad alone,
shift-and-restore is bit-exact, and every rank issues the same collectives. The local backend runs here;
DDP, FSDP2, tensor parallelism and ZeRO-1/2/3 run in one torchrun of 2 gloo ranks."""
import json

import pytest
import torch

import shardshap
from helpers.distributed import launch, torchrun
from shardshap.testing import cases
from shardshap.testing.conformance import run_conformance

ENGINES = ["ddp", "fsdp2", "tp", "z1", "z2", "z3"]


def _assert_passed(results):
    failed = {check: problems for check, problems in results.items() if any(p is not None for p in problems)}
    assert not failed, failed
    assert len(results) == 6


def test_local_backend_conforms():
    case = cases.tiny_gpt2(batch_size=8, dtype=torch.float32)
    opt = torch.optim.AdamW(case.model.parameters(), lr=3e-3)
    attr = shardshap.Attributor(case.model, opt, case.train_loss, case.target_loss)
    steps = iter(range(10))

    def backward():
        opt.zero_grad()
        case.train_loss(case.model, case.batches(next(steps))[0]).mean().backward()

    attr.step(*case.batches(next(steps)), None)
    results = run_conformance(attr, backward, lambda: attr.step(*case.batches(next(steps)), None),
                              lambda: {n: p.grad.clone() for n, p in case.model.named_parameters()},
                              lambda: case.target_loss(case.model, None)[:1], max_norm=0.05)
    assert type(attr.backend).__name__ == "LocalBackend"
    _assert_passed(results)


@pytest.fixture(scope="module")
def distributed_results():
    pytest.importorskip("deepspeed")
    proc, seconds = launch(torchrun("conformance.py", "--engines", ",".join(ENGINES)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("CONFORMANCE ")]
    return {r["engine"]: r for r in found}


@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.parametrize("engine", ENGINES)
def test_distributed_backend_conforms(distributed_results, engine):
    result = distributed_results[engine]
    expected = {"ddp": "DDPBackend", "fsdp2": "DTensorBackend", "tp": "DTensorBackend"}.get(engine, "ZeroBackend")
    assert result["backend"] == expected
    _assert_passed(result["results"])
