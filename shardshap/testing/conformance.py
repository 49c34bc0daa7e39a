"""The Backend contract, checked the same way for every backend (as zarr checks every Store).

`run_conformance(engine_name, attr, run_step, full_grads, evaluate, max_norm)` runs every check on one
rank of one engine; every rank of the data-parallel group calls it at the same point. Each check returns
None when it holds, else what went wrong; the results of all ranks are gathered, so rank 0 can report
them. The references are independent of the backend under test: full gradients read from the engine
itself (p.grad, DTensor.full_tensor, DeepSpeed's safe_get_full_grad) and torch's clip_grad_norm_.
"""
from __future__ import annotations

import torch


def _coverage(backend, shards):
    """Owned ranges cover every element of every parameter exactly once over the data-parallel group
    (partitioned backends), or each rank owns every element (replicated ones)."""
    local = {i: (sh.start, sh.value.numel()) for i, sh in enumerate(shards.values())}
    everyone = backend.all_gather_object(local)
    for i, sh in enumerate(shards.values()):
        numel = backend.full_shape(sh.param).numel()
        if not backend.partitioned:
            if any(r[i] != (0, numel) for r in everyone):
                return f"parameter {i}: a replicated backend owns {[r[i] for r in everyone]} of {numel} elements"
            continue
        ranges = sorted(r[i] for r in everyone if r[i][1] > 0)
        at = 0
        for start, n in ranges:
            if start != at:
                return f"parameter {i}: owned ranges {ranges} leave a gap or overlap at element {at}"
            at += n
        if at != numel:
            return f"parameter {i}: owned ranges {ranges} cover {at} of {numel} elements"
    return None


def _gather_inverts_owned(backend, shards):
    for i, sh in enumerate(shards.values()):
        shape = backend.full_shape(sh.param)
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(i))  # the same on every rank
        back = backend.gather(sh, backend.owned(sh, x, lead=1).clone())
        if back.shape != x.shape or not torch.equal(back, x):
            return f"parameter {i}: gather(owned(x)) != x"
    return None


def _clip(backend, shards, full_grads, max_norm):
    grads = list(full_grads().values())
    total = torch.nn.utils.get_total_norm([g.clone() for g in grads]).item()
    reference = min(1.0, max_norm / (total + 1e-6))  # clip_grad_norm_'s factor
    if reference >= 1.0:
        return f"the check needs a clipped step (norm {total:.3g} <= max_norm {max_norm})"
    before = {pid: sh.grad.clone() for pid, sh in shards.items()}
    factor = backend.clip(shards, max_norm)
    if abs(factor - reference) > 1e-5 * reference:
        return f"clip factor {factor!r}, torch's clip_grad_norm_ gives {reference!r}"
    for pid, sh in shards.items():
        if not torch.allclose(sh.grad, before[pid] * factor, rtol=1e-5, atol=1e-12):
            return "the owned gradients were not scaled by the returned factor"
    return None


def _target_gradients_leave_grad(backend, attr, full_grads, evaluate):
    before = {k: g.clone() for k, g in full_grads().items()}
    params = list(attr.plan.params.values())
    h, value = backend.target_gradients(evaluate, params, torch.float32)
    after = full_grads()
    if any(not torch.equal(before[k], after[k]) for k in before):
        return ".grad changed by target_gradients"
    if value.numel() != 1 or all(x is None for x in h):
        return f"no target gradient returned (losses {value})"
    return None


def _shift_and_restore(backend, optimizer, evaluate):
    shards = backend.shards(optimizer)
    before = {pid: sh.value.clone() for pid, sh in shards.items()}
    with torch.no_grad():
        loss_before = evaluate().detach().clone()
    shifts = {pid: 1e-2 * torch.randn(sh.value.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float32)
              for k, (pid, sh) in enumerate(shards.items())}
    try:
        with backend.shifted(shards, shifts):
            for pid, sh in shards.items():
                if not torch.equal(sh.value, before[pid] + shifts[pid].to(sh.value.dtype)):
                    return "inside shifted(): the owned values are not theta + shift"
            with torch.no_grad():
                loss_in = evaluate().detach().clone()
            raise KeyboardInterrupt  # leaving the block by an exception must restore too
    except KeyboardInterrupt:
        pass
    if torch.equal(loss_in, loss_before):
        return "inside shifted(): the forward does not see the shifted parameters"
    if any(not torch.equal(sh.value, before[pid]) for pid, sh in shards.items()):
        return "after shifted(): the owned values are not restored bit-exactly"
    with torch.no_grad():
        loss_after = evaluate().detach().clone()
    if not torch.equal(loss_after, loss_before):
        return "after shifted(): the forward does not see the restored parameters"
    return None


def _collective_order(backend, run_step):
    backend.collective_log = []
    run_step()
    log, backend.collective_log = backend.collective_log, None
    logs = backend.all_gather_object(log)
    if backend.distributed and not log:
        return "an attributed step issued no collective through the backend"
    if any(other != log for other in logs):
        return f"ranks issued different collectives: {[len(x) for x in logs]} calls"
    return None


def run_conformance(attr, backward, run_step, full_grads, evaluate, max_norm) -> dict:
    """Every check on this rank. `backward()`: one step's forward/backward (gradients ready, no optimizer
    step); `run_step()`: one full attributed step; `full_grads()`: {name: full gradient} read from the
    engine; `evaluate()`: the target loss [1]. Returns {check: [each rank's problem or None]}."""
    backend, optimizer = attr.backend, attr.optimizer
    results = {}
    results["collective order"] = _collective_order(backend, run_step)
    backward()
    shards = backend.shards(optimizer)
    results["coverage"] = _coverage(backend, shards)
    results["gather(owned(x)) == x"] = _gather_inverts_owned(backend, shards)
    results["target gradients leave .grad"] = _target_gradients_leave_grad(backend, attr, full_grads, evaluate)
    results["clip factor"] = _clip(backend, backend.shards(optimizer), full_grads, max_norm)
    # last: a no-grad forward between backward and step drops FSDP2's root gradients (its own behaviour)
    results["shift and restore"] = _shift_and_restore(backend, optimizer, evaluate)
    backend.zero_grad(optimizer)
    everyone = backend.all_gather_object(results)
    return {check: [r[check] for r in everyone] for check in results}
