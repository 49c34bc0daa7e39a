"""Checks of a step's input and of its products; each raises AttributionError before the optimizer steps
(checks of values with Config.check_timing='next-step': before the next one).

Checks of values (finite losses, products that add up) leave their verdicts on the device in a
`HostRead`, which brings them to the host all at once: read before the optimizer steps (one host sync per
step, not one per check; on a GPU every read stalls the host until the device has caught up), or, with
Config.check_timing='next-step', read at the next step (no sync: the copy has long arrived by then)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .errors import AttributionError
from .foreach import chunks, dots, on_device


class HostRead:
    """Device values a step reads on the host, and checks whose verdicts are device booleans, brought to the
    host together (one copy); a failed check then raises its own error, the first one added first.

    `read` waits for them (one host sync, before the step trains); `send` only starts the copy and returns
    the `Verdicts` in flight, read a step later (Config.check_timing='next-step': no sync)."""

    def __init__(self):
        self._checks: list[tuple[torch.Tensor, Callable[[], str]]] = []

    def check(self, failed: torch.Tensor, message: Callable[[], str]) -> None:
        """`failed`: a 0-d bool tensor; `message()` says what failed (it may read the device)."""
        self._checks.append((failed, message))

    def read(self, *values) -> list:
        """Raise the first failed check's error, else return `values` (tensors or numbers) on the host."""
        return self._bring(values, wait=True).result()

    def send(self, *values) -> "Verdicts":
        """Start copying the verdicts and `values` (tensors or numbers) to the host; nothing waits for it."""
        return self._bring(values, wait=False)

    def _bring(self, values: tuple, wait: bool) -> "Verdicts":
        checks, self._checks = self._checks, []
        tensors = [f for f, _ in checks] + [v for v in values if torch.is_tensor(v)]
        fetch = list
        if tensors:
            device = tensors[0].device
            # (cat promotes to the widest dtype; every float32 value is exact in float64)
            flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors]).to(torch.float64)
            if wait:
                numbers = flat.tolist()  # the one host sync
                fetch = lambda: numbers
            elif device.type == "cuda":  # into pinned memory without waiting; the event says when it is there
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record()
                fetch = lambda: (arrived.synchronize(), host.numpy())[1]
            else:  # (a CPU holds it already: host memory, read without a device read; other devices wait here)
                fetch = flat.cpu().numpy
        return Verdicts([m for _, m in checks], values, fetch)

    def raise_failed(self) -> None:
        """After another error in the step: raise the first failed check's error instead (its cause, e.g. a NaN
        loss, usually explains the other), else nothing."""
        if self._checks:
            self.read()

    def clear(self) -> None:
        self._checks = []


class Verdicts:
    """A step's check verdicts and values, on the host or on their way there (`HostRead.send`)."""

    def __init__(self, messages: list[Callable[[], str]], values: tuple, fetch: Callable[[], Sequence[float]]):
        self._messages, self._values, self._fetch = messages, values, fetch

    def result(self, late: str = "") -> list:
        """Wait for the numbers; raise AttributionError for the first failed check (its message, then `late`,
        or that the step was not taken), else return the values: a float for a number or a 0-d tensor, a
        host tensor of the same shape otherwise."""
        numbers = self._fetch()
        for message, failed in zip(self._messages, numbers):
            if failed:
                raise AttributionError(message() + (late or "; the optimizer step was not taken"))
        out, at = [], len(self._messages)
        for v in self._values:
            if not torch.is_tensor(v):
                out.append(float(v))
                continue
            n = v.numel()
            out.append(float(numbers[at]) if v.dim() == 0
                       else torch.as_tensor(numbers[at:at + n], dtype=torch.float64).reshape(v.shape).to(v.dtype))
            at += n
        return out


def check_loss(per_sample, ids: torch.Tensor, j: int, reads: HostRead) -> None:
    """train_loss returned one finite, differentiable loss per sample of micro-batch j, or one per position
    when its ids are per position (finite where they count; checked at `reads.read()`)."""
    if not torch.is_tensor(per_sample):
        raise AttributionError(f"train_loss must return a Tensor of per-sample losses, got "
                               f"{type(per_sample).__name__}")
    per_position = ids.dim() == 2
    if per_position and per_sample.shape != ids.shape:
        raise AttributionError(
            f"train_loss returned shape {tuple(per_sample.shape)} for micro-batch {j}, but its per-position "
            f"sample_ids have shape {tuple(ids.shape)}: with per-position ids train_loss returns one loss per "
            "position (e.g. token losses with reduction='none', [b, T-1]) and the ids have the same shape")
    if not per_position and per_sample.shape != (ids.shape[0],):
        raise AttributionError(
            f"train_loss returned shape {tuple(per_sample.shape)} for micro-batch {j}, but its sample_ids "
            f"has {ids.shape[0]} ids: it must return one loss per sample, shape [{ids.shape[0]}] (e.g. a loss "
            "with reduction='none', averaged over each sample's tokens), and sample_ids must match the batch")
    if not per_sample.requires_grad:
        raise AttributionError(f"train_loss returned a tensor without a graph for micro-batch {j} (computed "
                               "under torch.no_grad(), or detached): compute it from the model's forward with "
                               "gradients enabled")
    bad = ~torch.isfinite(per_sample.detach())
    if per_position:
        bad = bad & (ids >= 0).to(bad.device)

    def message():
        where = bad.nonzero().tolist() if per_position else bad.nonzero().flatten().tolist()
        which = "counted (row, position)s" if per_position else "samples at positions"
        return f"train_loss is not finite for {which} {where[:10]} of micro-batch {j}"
    reads.check(bad.any(), message)


def check_ids(ids: torch.Tensor, num_samples: int, per_position: bool = False) -> None:
    """The store's id rules, checked before training so that a bad step changes nothing (per-position ids:
    -1 marks positions that do not count; an id repeats over its document's positions)."""
    if per_position:
        ids = ids[ids != -1]
    bad = ids[(ids < 0) | (ids >= num_samples)]
    if len(bad):
        raise AttributionError(f"sample ids {bad[:5].tolist()} are outside [0, num_samples={num_samples}): ids "
                               "must index the training set (set Config(num_samples=...) to its size)")
    if not per_position and len(torch.unique(ids)) != len(ids):
        raise AttributionError("sample_ids has duplicates within one optimizer step; each sample of a step "
                               "needs its own id (the store keeps one slot per sample and step)")


# relative tolerance of the check by the lowest precision that entered a parameter's gradient or products
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 5e-2  # bf16 / fp16 (measured: up to 1.7e-2 for FSDP2 bf16 norm layers)


def check_completeness(backend, plan, per_param: dict[str, torch.Tensor], stacked: torch.Tensor, W, owned, shards,
                       clip, dtype, precision: dict[str, torch.dtype], reads: HostRead,
                       grad_dots: Optional[dict[int, torch.Tensor]] = None) -> None:
    """The per-sample products of each parameter add up to <batch gradient, W> (over all ranks).

    `per_param` names the rows of `stacked` ([params, players, K], the products). `W`: the full vectors the
    products used (low rank may have replaced them), or None when they were gathered on demand, in which
    case the owned elements `owned` are exactly them; read a few parameters at a time. `grad_dots`: id ->
    <batch gradient, W> [K] where the caller has it already. `precision`: per parameter name, the lowest
    float dtype its gradient or products were computed in (Capture.precision). A few kernels for all
    parameters; the verdict is read at `reads.read()`."""
    rows = [i for i, n in enumerate(per_param) if id(plan.params[n]) in shards]
    if not rows:  # no parameter moved this step: nothing to add up
        return
    names = [list(per_param)[i] for i in rows]
    params = [plan.params[n] for n in names]
    moved = stacked if len(rows) == len(per_param) else stacked[rows]
    K = stacked.shape[2]
    # [params, 2, K]: per-sample sums and sums of magnitudes, added over ranks in one collective
    sums = backend.all_reduce_sum(torch.stack([moved.sum(1), moved.abs().sum(1)], 1))
    grad_dots = grad_dots or {}
    g = [shards[id(p)].grad.to(dtype) for p in params]
    # a bf16/fp16 batch gradient is rounded per coordinate: where <g, W> cancels across coordinates its
    # error scales with sum_j |g_j W_j|, not with the per-sample magnitudes
    low = {i for i, p in enumerate(params) if p.dtype not in (torch.float32, torch.float64)}
    expected = torch.zeros(len(params), K, dtype=dtype, device=moved.device)
    rounding = torch.zeros_like(expected)
    given = [i for i, p in enumerate(params) if id(p) in grad_dots]
    if given:
        expected[given] = torch.stack([grad_dots[id(params[i])] for i in given]).to(dtype)
    to_read = [i for i, p in enumerate(params) if id(p) not in grad_dots or i in low]
    for chunk in chunks([K * backend.full_shape(params[i]).numel() for i in to_read]):
        chunk = [to_read[j] for j in chunk]
        w = [owned[id(params[i])] if W is None else backend.owned(shards[id(params[i])], W[id(params[i])], lead=1)
             for i in chunk]  # (views)
        computed = [j for j, i in enumerate(chunk) if id(params[i]) not in grad_dots]
        if computed:
            expected[[chunk[j] for j in computed]] = dots([w[j] for j in computed], [g[chunk[j]] for j in computed])
        lows = [j for j, i in enumerate(chunk) if i in low]
        if lows:
            rounding[[chunk[j] for j in lows]] = dots(torch._foreach_abs([w[j] for j in lows]),
                                                      torch._foreach_abs([g[chunk[j]] for j in lows]))
    partial = torch.stack([expected, rounding], 1) / clip
    counted = tuple(float(shards[id(p)].counted) for p in params)
    if not all(counted):  # (another model-parallel rank counts its copy of these)
        partial = partial * on_device(counted, partial.dtype, partial.device)[:, None, None]
    exp_and_rounding = backend.reduce_partial(partial)
    (ghost, magnitude), (exp, rounding) = sums.unbind(1), exp_and_rounding.unbind(1)  # each [params, K]
    tol = tuple(TOLERANCE.get(precision[n], LOW_PRECISION_TOLERANCE) for n in names)
    rel = ((ghost - exp).abs() / (magnitude + exp.abs() + rounding + 1e-30)).amax(1)

    def message():
        bad = [f"{name} (relative mismatch {r:.2e}, tolerance {t:g} for {str(precision[name]).removeprefix('torch.')})"
               for name, r, t in zip(names, rel.tolist(), tol) if r > t]
        return ("per-sample products do not add up to the batch gradient for: " + ", ".join(bad) + ". The "
                "parameter is probably used outside the module that owns it (a functional call such as "
                "F.linear(x, module.weight)) or broadcast across the batch. Exclude it with Config(exclude=[...]) "
                "or route its use through its module")
    reads.check((rel > on_device(tol, rel.dtype, rel.device)).any(), message)

