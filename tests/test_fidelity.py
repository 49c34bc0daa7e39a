"""Fidelity vs the exact Shapley values of the TRUE one-step game (real optimizer, all 2^|B| subsets).

Prints the Pearson R of every estimator so the gap is visible (docs/method.md has the table, produced
by `python benchmarks/fidelity.py`)."""
import pytest
import torch

import cases
from shardshap.verify import compare_estimators

WARM = 10


def train_plain(case, opt, steps, start=0):
    for s in range(start, start + steps):
        b, _ = case.batches(s)
        opt.zero_grad()
        case.train_loss(case.model, b).mean().backward()
        opt.step()


def report(title, results):
    print(f"\n{title}")
    for r in results:
        print(f"  {r.name:>14}: R = {', '.join(f'{x:.5f}' for x in r.pearson)}   "
              f"efficiency gap = {', '.join(f'{x:.2%}' for x in r.efficiency_gap)}")


CASES = {
    "mlp-digits": (lambda: cases.digits_mlp(batch_size=10), 3e-3),
    "gpt2": (lambda: cases.tiny_gpt2(batch_size=8), 3e-3),
    "llama": (lambda: cases.tiny_llama(batch_size=8), 3e-3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_secant_fidelity_adamw_warm(name):
    make, lr = CASES[name]
    case = make()
    opt = torch.optim.AdamW(case.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    train_plain(case, opt, WARM)
    b, ids = case.batches(WARM)
    orc, results = compare_estimators(case.model, opt, case.train_loss, case.target_loss, b, ids, None)
    report(f"{name}, AdamW, step {WARM + 1}, |B| = {len(ids)}", results)
    secant = next(r for r in results if r.name == "secant/2")
    assert min(secant.pearson) >= 0.999, secant.pearson
    assert max(secant.efficiency_gap) <= 0.01, secant.efficiency_gap


def test_secant_fidelity_sgd_momentum():
    case = cases.digits_mlp(batch_size=10)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-3)
    train_plain(case, opt, WARM)
    b, ids = case.batches(WARM)
    orc, results = compare_estimators(case.model, opt, case.train_loss, case.target_loss, b, ids, None)
    report(f"mlp-digits, SGD momentum 0.9, step {WARM + 1}", results)
    secant = next(r for r in results if r.name == "secant/2")
    assert min(secant.pearson) >= 0.999, secant.pearson
    assert max(secant.efficiency_gap) <= 0.01, secant.efficiency_gap


@pytest.mark.parametrize("name", list(CASES))
def test_cold_adam_steps_are_reported(name):
    """The first Adam steps (state near zero, update close to lr*sign(g)) are the hard case for every
    estimator; the values are recorded here, not hidden (see docs/method.md, 'Cold steps')."""
    make, lr = CASES[name]
    case = make()
    opt = torch.optim.AdamW(case.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rows = []
    for step in range(3):
        b, ids = case.batches(step)
        _, results = compare_estimators(case.model, opt, case.train_loss, case.target_loss, b, ids, None,
                                        variants=[dict(estimator="secant", order=2), dict(estimator="sgd", order=2)])
        rows.append((step + 1, results))
        train_plain(case, opt, 1, start=step)
    print(f"\n{name}: cold AdamW steps")
    for step, results in rows:
        print(f"  step {step}: " + "  ".join(f"{r.name} R = {min(r.pearson):.4f} (efficiency gap "
                                            f"{max(r.efficiency_gap):.1%})" for r in results))
    for _, results in rows:
        for r in results:
            assert all(-1.0 <= x <= 1.0 for x in r.pearson)  # finite, well-defined numbers
    # the secant recovers within a few steps as Adam's second moment fills in
    secant = [min(r.pearson) for _, results in rows for r in results if r.name == "secant/2"]
    assert secant[-1] > secant[0]
