"""Which modules are attributed (`plan`), and the hooks that cache their inputs and output gradients."""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.profiler import record_function

from ..errors import BatchShapeError, UnsupportedModule
from ..foreach import batched
from .lowrank import MIN_ENERGY, Factors, factorize_all, sketch_matrix, worth_it
from .parallel import ModelParallel, local_capture
from .players import MicroPlayers, Players
from .registry import ProductRule, grads_products, product_rule_for
from .sketch import Basis, find_basis, flat_products, kept_energy


class Products(NamedTuple):
    """What `Capture.products` computed, and with which W."""
    per_param: dict[str, torch.Tensor]  # canonical parameter name -> [samples, K]
    W: Mapping[int, torch.Tensor]       # id(param) -> the W [K, *shape] the products used
    lowrank: dict                       # low rank only: energy, layer_rank, exact_layers (else empty)
    grad_dots: Optional[dict[int, torch.Tensor]] = None  # id(param) -> <batch gradient, W used> [K], where
    #                                                      computed on the way (sketches: no dense W needed)


@dataclass
class AttributedModule:
    name: str
    module: nn.Module
    rule: ProductRule
    params: dict[str, nn.Parameter]  # the module's own attributed parameters, by local name


@dataclass
class Plan:
    modules: list[AttributedModule]
    params: dict[str, nn.Parameter]      # canonical name -> attributed parameter (tied weights once)
    excluded: list[str] = field(default_factory=list)


def plan(model: nn.Module, exclude: list[str], trainable: Optional[set[int]] = None) -> Plan:
    """Match every trainable parameter to the rule of the module that owns it, or fail listing the rest.

    `trainable`: ids of the parameters the optimizer updates (others do not move and carry no value).
    """
    aliases: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(pname)
    canonical = {id(p): pname for pname, p in model.named_parameters()}

    def excluded(pid: int, owners: list[str]) -> bool:
        names = aliases.get(pid, []) + owners
        return any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, pat + ".*") for n in names
                   for pat in exclude)

    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)

    def attributable(p) -> bool:
        return p.requires_grad and (trainable is None or id(p) in trainable)

    modules, covered, excluded_names = [], set(), set()
    for mname, m in model.named_modules():
        rule = product_rule_for(m)
        own = dict(m.named_parameters(recurse=False))
        if rule is None or not own:
            continue
        chosen = {}
        for local, p in own.items():
            if local not in rule.param_names or not attributable(p):
                continue
            if excluded(id(p), owners[id(p)]):
                excluded_names.add(canonical[id(p)])
                continue
            chosen[local] = p
            covered.add(id(p))
        if chosen:
            rule.validate(m, mname or type(m).__name__)
            modules.append(AttributedModule(mname, m, rule, chosen))

    missing = []
    for pname, p in model.named_parameters():
        if not attributable(p) or id(p) in covered:
            continue
        if excluded(id(p), owners.get(id(p), [])):
            excluded_names.add(pname)
            continue
        owner = model.get_submodule(pname.rpartition(".")[0]) if "." in pname else model
        missing.append(f"{pname} (in {type(owner).__name__})")
    if missing:
        raise UnsupportedModule(
            "no per-sample product rule covers these trainable parameters: " + ", ".join(missing)
            + ". Exclude them with Config(exclude=[...]) (they are still trained; their share of the values is "
            "dropped and recorded), or register a rule with @shardshap.ghost.register(YourModule).")
    params = {canonical[id(p)]: p for am in modules for p in am.params.values()}
    return Plan(modules=modules, params=params, excluded=sorted(excluded_names))


def _cast(x: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return x if dtype is None or x is None or not x.is_floating_point() else x.to(dtype)


# Captures of at most this many numbers are cast to Config.cache_dtype with their stack where layers are stacked
# (foreach.batched): one kernel per group of same-shaped layers instead of one per capture. A launch takes about
# as long as copying 2^20 numbers on a current GPU, so below it the launches are what a cast costs; above it the
# copy is, and the capture is cast in the hook, which keeps the cache at half its size until the products.
CAST_LATER_NUMBERS = 1 << 20


def _kept(x: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """Capture `x` as the cache keeps it: cast to `dtype` now, or in its own dtype until stacked (or until the
    next micro-batch starts) if it is small and layers are stacked."""
    later = x is not None and x.numel() <= CAST_LATER_NUMBERS and batched(x.device)
    return x if later else _cast(x, dtype)


@dataclass
class _Call:
    micro: int
    a: Optional[torch.Tensor]   # the module input (released once `grads` is taken)
    e: Optional[torch.Tensor] = None
    grads: Optional[dict[str, torch.Tensor]] = None  # per-sample gradients (ProductRule.reduce_in_backward)
    token_split: bool = False  # tensor parallelism: the captures hold this rank's tokens only
    module: Optional[nn.Module] = None  # tensor parallelism: the module as its local slice (ProductRule.local_view)


def _as_called(am: AttributedModule, call: _Call) -> AttributedModule:
    """The attributed module with the module its call's captures belong to (its local slice, if any)."""
    return am if call.module is None else replace(am, module=call.module)


class _Tap(torch.autograd.Function):
    """Identity on a module's output whose backward hands (module input, output gradient) to `sink`.

    The input is kept with `save_for_backward`, so activation checkpointing drops and recomputes it like
    autograd's own saved tensors, and the sink runs once, in whichever pass autograd backpropagates
    through (the recomputation under reentrant checkpointing, the original forward otherwise). The output
    is returned detached rather than as a view, so that in-place ops on it stay legal."""

    @staticmethod
    def forward(ctx, output, a, sink):
        ctx.sink = sink
        ctx.save_for_backward(a)
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        ctx.sink(a, grad.detach())
        return grad, None, None


def exact_math(device: torch.device):
    """Autocast off: attribution's own products and per-sample gradients keep the dtype they are given, also when
    the user's training step runs under torch.autocast (matmuls would otherwise round to bf16). Nothing is
    entered when autocast is off already (an autocast context, even a disabled one, keeps its weight-cast
    cache alive across the target passes inside it)."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) else nullcontext()


def _lowest(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two float dtypes."""
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def refused_by_reentrant_checkpoint(err: BaseException) -> bool:
    """torch's error for autograd.grad() through a reentrant (use_reentrant=True) checkpoint."""
    return isinstance(err, RuntimeError) and "use_reentrant=True" in str(err)


def _in_backward() -> bool:
    """Whether autograd is running a backward now (a forward hook then fires in a checkpoint's recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _per_player(mp: MicroPlayers, fn, a, e, per_token: int) -> dict[str, torch.Tensor]:
    """fn(a, e) per sample, or summed over each player's tokens for per-position ids: {name: [m, ...]}."""
    return mp.over_tokens(fn, a, e, per_token) if mp.per_position else fn(a, e)


def _features(x: torch.Tensor) -> int:
    return int(x[0, 0].numel()) if x.dim() >= 2 else 1


def _call_products(am: AttributedModule, a, e, grads, Wm, work: torch.dtype,
                   mp: MicroPlayers) -> dict[str, torch.Tensor]:
    """One module call's {param: [m, K]} products for its micro-batch's m players, from (a, e) or from
    its per-player gradients."""
    if grads is not None:
        return grads_products(grads, Wm)
    a = a if not a.is_floating_point() else a.to(work)
    if not mp.per_position:
        return am.rule.products(am.module, a, e.to(work), Wm)
    K = max(len(getattr(w, "energy", w)) for w in Wm.values()) if Wm else 1  # (Factors: energy is [K])
    return mp.over_tokens(lambda a_, e_: am.rule.products(am.module, a_, e_, Wm), a, e.to(work),
                          (K + 1) * (_features(a) + _features(e)))


def _call_grads(am: AttributedModule, a, e, names: list[str], mp: MicroPlayers) -> dict[str, torch.Tensor]:
    """{param: [m, *shape]}: per-player gradients of one module call."""
    numel = sum(am.params[n].numel() for n in names)
    return _per_player(mp, lambda a_, e_: am.rule.per_sample_grads(am.module, a_, e_, names), a, e, numel)


class _Job(NamedTuple):
    """One module call's products to take: its captures, the module's W (by local name) and the dtype."""
    am: AttributedModule
    call: _Call
    Wm: dict
    work: torch.dtype


GROUP_NUMBERS = 1 << 27  # captures stacked into one batched call at most (512 MiB in fp32)


def _batch_key(job: _Job, per_position: bool):
    """Calls with the same key run as one batched call; None: on its own."""
    factored = any(isinstance(w, Factors) for w in job.Wm.values())
    if factored and job.call.grads is not None:
        return None
    shapes = tuple((local, w.left.shape, w.right.shape, w.left.dtype) if isinstance(w, Factors)
                   else (local, w.shape, w.dtype) for local, w in job.Wm.items())
    if job.call.grads is not None:
        return "grads", job.work, shapes, tuple((n, g.shape, g.dtype) for n, g in job.call.grads.items())
    if job.am.rule.batchable and not per_position:
        a, e = job.call.a, job.call.e
        return type(job.am.rule), job.work, shapes, a.shape, a.dtype, e.shape, e.dtype
    return None


def _batches(jobs: list[_Job], per_position: bool, enabled: bool) -> list[list[_Job]]:
    """The jobs in groups of equal batch keys (in order of first appearance), each holding at most about
    GROUP_NUMBERS numbers of captures; each on its own unless `enabled`."""
    groups: dict = {}
    out = []
    for job in jobs:
        key = _batch_key(job, per_position) if enabled else None
        numbers = sum(x.numel() for x in (job.call.grads or {"a": job.call.a, "e": job.call.e}).values())
        group = groups.get(key) if key is not None else None
        if group is None or group[1] + numbers > GROUP_NUMBERS:
            group = groups[key] = [[], 0]
            out.append(group[0])
        group[0].append(job)
        group[1] += numbers
    return out


def _batched_products(group: list[_Job], dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """The products of calls with one batch key, as one call under torch.func.vmap over their stacked captures
    and W: per call {param: [b, K]} in `dtype` (cast once for the group)."""
    first = group[0]
    factored = {local for local, w in first.Wm.items() if isinstance(w, Factors)}  # (low rank: stacked by side)
    Wm = {local: tuple(torch.stack([getattr(job.Wm[local], side) for job in group]).to(first.work)
                       for side in ("left", "right")) if local in factored
          else torch.stack([job.Wm[local] for job in group]).to(first.work) for local in first.Wm}
    if first.call.grads is not None:
        grads = {n: torch.stack([job.call.grads[n] for job in group]) for n in first.call.grads}
        out = torch.func.vmap(grads_products)(grads, Wm)
    else:
        a = torch.stack([job.call.a for job in group])
        a = a.to(first.work) if a.is_floating_point() else a
        e = torch.stack([job.call.e for job in group]).to(first.work)
        rule, module = first.am.rule, first.am.module  # (a batchable rule reads nothing of the module)
        def products(a_, e_, W_):
            W_ = {local: Factors(*w, energy=None) if local in factored else w for local, w in W_.items()}
            return rule.products(module, a_, e_, W_)
        out = torch.func.vmap(products)(a, e, Wm)
    out = {local: v.to(dtype) for local, v in out.items()}
    return [{local: v[j] for local, v in out.items()} for j in range(len(group))]


class _Stream:
    """The streaming schedule's fixed W (or the bases of its sketches) and what the backward took so far."""

    def __init__(self, Wm: Optional[dict[str, dict]], K: int, dtype: torch.dtype,
                 bases: Optional[dict[int, Basis]] = None):
        self.Wm, self.K, self.dtype = Wm, K, dtype  # Wm: module name -> {local param name: W or Factors}
        self.bases = bases  # sketches: id(param) -> Basis (parameters without one keep per-sample gradients)
        self.worked: set[torch.dtype] = set()  # dtypes the sketches were taken in (cache_dtype set)
        # micro-batch -> canonical name -> products [b, K], or sketches [b, p, q] / per-sample gradients
        self.out: dict[int, dict[str, torch.Tensor]] = {}


def _call_sketches(am: AttributedModule, a, e, grads, bases: dict[int, Basis], work,
                   mp: MicroPlayers) -> dict[str, torch.Tensor]:
    """One module call's sketches [m, p, q] of its sketched weights and per-player gradients of the rest."""
    if grads is not None:
        return grads
    a = a if not a.is_floating_point() else a.to(work)
    e = e.to(work)
    out, rest = {}, []
    for local, p in am.params.items():
        basis = bases.get(id(p))
        if basis is None:
            rest.append(local)
        else:
            U, V = basis.sides(work)
            out.update(_per_player(mp, lambda a_, e_, U=U, V=V, local=local: {
                local: am.rule.sketch(am.module, a_, e_, U, V)}, a, e, U.shape[1] * V.shape[1]))
    if rest:
        out.update(_call_grads(am, a, e, rest, mp))
    return out


def _sides(basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    return basis.U, basis.V


def _factors_to_dense(rule: ProductRule) -> Callable[[Factors], torch.Tensor]:
    return lambda f: rule.weight_matrix(f.dense())


class _DenseOnRead(Mapping):
    """id(param) -> the W [K, *shape] products were taken with, kept compact as (to_dense, value) and multiplied
    out on read (low-rank factors, projections; to_dense None: value is W itself)."""

    def __init__(self, kept: dict[int, tuple[Optional[Callable], object]]):
        self.kept = kept

    def __getitem__(self, pid):
        to_dense, value = self.kept[pid]
        return value if to_dense is None else to_dense(value)

    def __iter__(self):
        return iter(self.kept)

    def __len__(self):
        return len(self.kept)


class Capture:
    """Forward hooks tap each attributed module's output; in the backward the tap receives the module's
    input and output gradient. The cached schedule keeps them until `products`; the streaming schedule
    (`stream`) turns them into products at once. Active only inside `recording()` (training forward, and
    its backward even after the block), never during target passes (`paused`)."""

    def __init__(self, plan_: Plan, cache_dtype: Optional[torch.dtype] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        self.plan = plan_
        # dtype of the per-sample gradients that rules with reduce_in_backward take in the hook (None: the
        # capture's own, at least float32)
        self.compute_dtype = compute_dtype
        # None: keep captures as they come. bf16: matrix rules' captures are cast to it (their products are
        # GEMMs that bf16 units speed up); norms and embeddings gain nothing and stay as they are. Each is cast
        # while it is hot, except small ones where layers are stacked (_kept)
        self.cache_dtype = cache_dtype
        self.calls: dict[str, list[_Call]] = {am.name: [] for am in plan_.modules}
        self._names = {id(p): n for n, p in plan_.params.items()}
        uses: dict[int, bool] = {}
        for am in plan_.modules:
            for local, p in am.params.items():
                uses[id(p)] = uses.get(id(p), True) and local in am.rule.sketched
        self._sketchable = {pid: name for pid, name in self._names.items() if uses.get(pid)}
        self.players = Players()  # this step's players: the rows of its values
        self._batch_size: Optional[int] = None
        self._micro = 0
        self._last: Optional[tuple[int, int]] = None  # (batch size, micro-batch) of the latest recording
        self._paused = False
        self._muted = False  # taps as usual (a checkpoint recomputes the same saved tensors), nothing captured
        self._stream: Optional[_Stream] = None
        self._seen: dict[str, torch.dtype] = {}  # module name -> lowest dtype of its output gradients this step
        self._probe: Optional[list] = None  # while probing: [(module name, tapped output)] of the forward
        self.tapped = 0  # module calls tapped this step (none: the hooks did not run, e.g. a stale compiled graph)
        self._largest = self._largest_before = 0  # most numbers in one capture, this step and the last one
        self.model_parallel: Optional[ModelParallel] = None  # tensor parallelism (set by the Attributor)
        self._handles = []
        for am in plan_.modules:
            # (first among the forward hooks: a tensor-parallel module's own hook would turn its DTensor output
            # into a local tensor whose layout is no longer known)
            self._handles.append(am.module.register_forward_hook(self._hook(am), prepend=True))

    def _context(self) -> Optional[tuple[int, int]]:
        """(batch size, micro-batch) a module call belongs to, or None when it is not recorded."""
        if self._paused:
            return None
        if self._batch_size is not None:
            return self._batch_size, self._micro
        # a checkpoint's recomputation in a backward run after the recording block must tap as the
        # original forward did (reentrant: that is where the products come from; non-reentrant: the
        # recomputed saved tensors must match the original ones)
        return self._last if self._last is not None and _in_backward() else None

    def _hook(self, am: AttributedModule):
        def hook(module, args, output):
            context = self._context()
            if context is None:
                return None
            batch_size, micro = context
            a = args[0]
            expanded = am.rule.per_sample_view(module, args, output, batch_size)
            if expanded is not None:
                a, output = expanded
            if a.dim() == 0 or a.shape[0] != batch_size:
                raise BatchShapeError(
                    f"module {am.name!r} ({type(module).__name__}) was called with an input of shape "
                    f"{tuple(a.shape)} but sample_ids gives this micro-batch {batch_size} samples. Either "
                    "sample_ids does not match the batch (one id per sample, in batch order), or the module does "
                    "not take the batch as the first dimension of its input (exclude it with "
                    "Config(exclude=[...]) if it is shared across the batch).")
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                # no backward reaches this call (no_grad, or a reentrant checkpoint's first pass)
                return output if expanded is not None else None
            a, a_split = local_capture(a.detach(), am.name)
            tapped = _Tap.apply(output, a, lambda a_, e_: self._arrived(am, micro, batch_size, a_, e_, a_split))
            self.tapped += 1
            if self._probe is not None:
                self._probe.append((am.name, tapped))
            return tapped
        return torch.compiler.disable(hook)  # (compiled models: run eagerly, not retraced per module)

    def _arrived(self, am: AttributedModule, micro: int, batch_size: int, a: torch.Tensor, e: torch.Tensor,
                 a_split: bool = False) -> None:
        """The backward reached one call of `am`: its input `a` and output gradient `e` are hot."""
        if self._muted:  # the batch-first probe's backward
            return
        e, e_split = local_capture(e, am.name)
        with exact_math(e.device):  # (a backward inside the user's autocast runs under it)
            self._take(am, micro, a, e, a_split or e_split)

    def _take(self, am: AttributedModule, micro: int, a: torch.Tensor, e: torch.Tensor, token_split: bool) -> None:
        self._seen[am.name] = _lowest(e.dtype, self._seen.get(am.name, e.dtype))  # (autocast, mixed precision)
        self._largest = max(self._largest, a.numel(), e.numel())
        low = self._low_dtype(am)
        grads = None
        mp = self.players.micro[micro]
        module = None
        if self.model_parallel is not None and self.model_parallel.tokens_split:
            token_split = True
        splits = self.model_parallel.splits if self.model_parallel is not None else {}
        split = {local: splits[id(p)] for local, p in am.params.items() if id(p) in splits}
        if split:  # this rank holds a slice of the module's parameters
            view, a, e = am.rule.local_view(am.module, a, e, split)
            if view is not am.module:
                module, am = view, replace(am, module=view)
        if am.rule.reduce_in_backward:  # take the per-player gradients now and keep them instead of (a, e)
            dtype = self.compute_dtype or torch.promote_types(e.dtype, torch.float32)
            grads = _call_grads(am, a.to(dtype) if a.is_floating_point() else a, e.to(dtype), list(am.params), mp)
            a = e = None
        stream = self._stream
        if stream is None:
            self.calls[am.name].append(_Call(micro, _kept(a, low), _kept(e, low), grads, token_split, module))
            return
        work = stream.dtype if low is None else low
        if stream.bases is not None and low is not None and e is not None:
            # sketches project onto a few directions: thin GEMMs bound by reading the captures, which a cast
            # would read once more; they take the output gradient's own dtype (bf16 under autocast)
            work = e.dtype
            stream.worked.add(work)
        with record_function(f"shardshap.products.{type(am.rule).__name__}"):
            res = (_call_products(am, a, e, grads, stream.Wm[am.name], work, mp) if stream.bases is None
                   else _call_sketches(am, a, e, grads, stream.bases, work, mp))
        out = stream.out.setdefault(micro, {})
        for local, val in res.items():
            name = self._names[id(am.params[local])]
            acc = out.get(name)
            out[name] = val.to(stream.dtype) if acc is None else acc + val

    def _low_dtype(self, am: AttributedModule) -> Optional[torch.dtype]:
        """The dtype a module's captures are kept and multiplied in, or None for as they come."""
        return self.cache_dtype if am.rule.low_precision_pays else None

    @contextmanager
    def recording(self, sample_ids: torch.Tensor, micro: int):
        """Capture micro-batch `micro` of the step (0, 1, ... in order): its training forward, and the backward
        that follows even after the block. `sample_ids`: one per sample, or per position (ghost/players.py)."""
        if micro == len(self.players.micro):
            self.players.add(sample_ids)
            if self.players.per_position:
                self._check_tokenwise()
        if micro > 0:
            self._cast_kept()
        batch_size = sample_ids.shape[0]
        self._batch_size, self._micro = batch_size, micro
        self._last = (batch_size, micro)
        try:
            yield
        finally:
            self._batch_size = None

    def _cast_kept(self) -> None:
        """Cast the kept captures not yet in their cache dtype (those of the micro-batches recorded so far)."""
        for am in self.plan.modules:
            low = self._low_dtype(am)
            if low is not None:
                for call in self.calls[am.name]:
                    call.a, call.e = _cast(call.a, low), _cast(call.e, low)

    @contextmanager
    def paused(self):
        """No capture inside (target passes, even through a checkpoint's recomputation)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextmanager
    def probing(self):
        """Keep references to the tapped outputs of the forward inside (for `check_batch_first`)."""
        self._probe = []
        try:
            yield self._probe
        finally:
            self._probe = None

    def check_batch_first(self, first_loss: torch.Tensor, outputs: list) -> None:
        """Raise BatchShapeError for a module whose leading dimension is not the batch: the gradient of sample
        0's loss alone must be zero on every other sample's rows of each attributed module's output (the
        shape checks cannot see a time-major module when T equals the batch size). Not checked through a
        reentrant checkpoint, which refuses autograd.grad()."""
        if not outputs or first_loss.numel() == 0:
            return
        self._muted = True
        try:
            grads = torch.autograd.grad(first_loss, [t for _, t in outputs], retain_graph=True, allow_unused=True)
        except RuntimeError as err:
            if refused_by_reentrant_checkpoint(err):
                return
            raise
        finally:
            self._muted = False
        for (name, _), g in zip(outputs, grads):
            if g is not None and g.shape[0] > 1 and bool(g[1:].ne(0).any()):
                raise BatchShapeError(
                    f"module {name!r} mixes the samples of a batch along the first dimension of its output: the "
                    "loss of sample 0 has a gradient on the rows of other samples. shardshap needs every attributed "
                    "module to take the batch as its first dimension (e.g. batch_first=True; time-major [T, b, ...] "
                    "inputs pass the shape checks when T equals the batch size but give per-time-step values), and "
                    "no operation that mixes samples (batch normalisation) before the loss. Transpose to batch-first "
                    "or exclude the module with Config(exclude=[...]).")

    def precision(self) -> dict[str, torch.dtype]:
        """Per parameter name: the lowest float dtype its gradient or products were computed in this step (its
        own dtype, its modules' output gradients under autocast or mixed precision, cache_dtype)."""
        out = {name: p.dtype for name, p in self.plan.params.items()}
        for am in self.plan.modules:
            for p in am.params.values():
                name = self._names[id(p)]
                for dt in (self._seen.get(am.name), self._low_dtype(am)):
                    if dt is not None:
                        out[name] = _lowest(out[name], dt)
        return out

    def _check_tokenwise(self) -> None:
        bad = [f"{am.name} ({type(am.module).__name__})" for am in self.plan.modules if not am.rule.tokenwise]
        if bad:
            raise UnsupportedModule(
                "per-position sample_ids split each sample's gradient by token, which these modules' product rules "
                f"cannot (their per-sample gradient is not a sum over tokens): {', '.join(bad)}. Exclude them "
                "with Config(exclude=[...]) or pass one id per sample.")

    def small_tensors(self) -> bool:
        """Whether every capture of this step (before it records, the last step) has at most CAST_LATER_NUMBERS
        numbers: casts of tensors this size cost their launches more than their copies."""
        return (self._largest or self._largest_before) <= CAST_LATER_NUMBERS

    def clear(self) -> None:
        self._largest_before, self._largest = self._largest or self._largest_before, 0
        self.players = Players()
        self.tapped = 0
        self._seen.clear()
        for calls in self.calls.values():
            calls.clear()
        self._stream = None
        self._last = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    # ---------------------------------------------------------------- streaming schedule
    def stream(self, W: Mapping[int, torch.Tensor], dtype: torch.dtype, K: int,
               rank: Optional[int] = None) -> tuple[dict, Mapping[int, torch.Tensor]]:
        """Take this step's products in the backward, against the fixed `W` (id(param) -> [K, *shape]),
        instead of keeping captures. `W` is read one module at a time (a mapping that gathers on read under
        FSDP2/ZeRO-3 then has one module's W whole at a time); with `rank`, matrix weights keep only their
        rank-r factors. Returns the low-rank info (as `products`) and the W the products use, made dense on
        read (the completeness check reads it parameter by parameter)."""
        kept: dict[int, tuple[Optional[ProductRule], object]] = {}  # id -> (rule that factorised it, Factors | W)
        info = {"energy": {}, "layer_rank": {}, "exact_layers": []} if rank is not None else {}
        Wm = {}
        for am in self.plan.modules:
            work = self._low_dtype(am) or dtype
            Wm[am.name] = {}
            for local, p in am.params.items():
                pid = id(p)
                if pid not in kept:
                    kept[pid] = (None, W[pid])
                    if rank is not None and local == "weight":  # (whichever module's rule factorises it)
                        with record_function("shardshap.products.factorize"):
                            factors, layer = self._factorize({pid: kept[pid][1]}, rank, self._names)
                        for key in ("energy", "layer_rank"):
                            info[key].update(layer[key])
                        info["exact_layers"] += layer["exact_layers"]
                        if pid in factors:
                            kept[pid] = factors[pid]
                rule, value = kept[pid]
                if rule is None:
                    Wm[am.name][local] = value.to(work)
                elif rule is am.rule:
                    Wm[am.name][local] = value.to(work)
                else:  # a tied weight's use in the other orientation takes the dense W_r
                    Wm[am.name][local] = rule.weight_matrix(value.dense()).to(work)
        self._stream = _Stream(Wm, K, dtype)
        return info, _DenseOnRead({pid: (None if rule is None else _factors_to_dense(rule), value)
                                   for pid, (rule, value) in kept.items()})

    # ------------------------------------------------------------------ sketches (stream_predictor="subspace")
    def sketchable(self) -> dict[int, str]:
        """id -> canonical name of the parameters that every module using them can sketch (matrix weights)."""
        return self._sketchable

    def bases(self, W: Mapping[int, torch.Tensor], rank: int) -> dict[int, Basis]:
        """Bases of `rank` directions per target and side for the sketchable parameters, from W (read one
        parameter at a time in plan order: collectives under FSDP2/ZeRO-3)."""
        return {pid: find_basis(W[pid], rank) for pid in self.sketchable()}

    def sketch(self, bases: dict[int, Basis], dtype: torch.dtype) -> None:
        """Take this step's per-sample sketches (and per-sample gradients of the other parameters) in the
        backward, for `sketched` to multiply by the step's W afterwards."""
        self._stream = _Stream(None, 0, dtype, bases)

    def sketched(self, W: Mapping[int, torch.Tensor], K: int, rank: int,
                 grads: Optional[Mapping[int, torch.Tensor]] = None) -> tuple[Products, dict[int, Basis]]:
        """Per attributed parameter: [players, K] products of this step's sketches with `W`. `Products.W` holds
        the projected W they equal products with (multiplied out on read), `Products.lowrank["energy"]` what
        the projection kept of each W (0-d tensors, not read back). Also returns the next step's bases
        (`bases`), found from the same reads of W. Parameters of one shape are taken together (vmap over their
        stacked W) when W is a dict; a mapping that gathers on read is read one parameter at a time, in plan
        order. `grads` (id -> the whole batch gradient, in the parameter's shape): `Products.grad_dots` then has
        <G, U U^T W V V^T> = <U^T G V, U^T W V> of every sketched weight, without multiplying the projection out."""
        stream = self._stream
        device = next(iter(self.plan.params.values())).device
        out, used, kept, bases, grad_dots = {}, {}, {}, {}, {}
        for group in self._sketch_groups(W):
            Wg = torch.stack([W[pid] for _, pid in group])  # [G, K, *shape]
            first = group[0][1]
            if first in self.sketchable():
                G, K_, m, n = Wg.shape
                omega = sketch_matrix(K_, m, min(rank, m, n), Wg.device, Wg.dtype)  # (the same for each: as alone)
                U, V = torch.func.vmap(lambda w, omega=omega: _sides(find_basis(w, rank, omega)))(Wg)
                # (in the dtypes this step's sketches took, likely the next step's: cast for the whole group)
                cast = {dt: (U.to(dt), V.to(dt)) for dt in stream.worked if dt != U.dtype}
                bases.update({pid: Basis(U[j], V[j], {dt: (Uc[j], Vc[j]) for dt, (Uc, Vc) in cast.items()})
                              for j, (_, pid) in enumerate(group)})
            if stream.bases.get(first) is None:  # kept per-sample gradients, against W itself
                against = Wg
                used.update({pid: (None, Wg[j]) for j, (_, pid) in enumerate(group)})
            else:  # sketches, against the projection of W on the basis
                U = torch.stack([stream.bases[pid].U for _, pid in group])
                V = torch.stack([stream.bases[pid].V for _, pid in group])
                against = torch.func.vmap(lambda U_, V_, w: Basis(U_, V_).project(w))(U, V, Wg)
                energy = torch.func.vmap(kept_energy)(Wg, against)
                for j, (name, pid) in enumerate(group):
                    used[pid], kept[name] = (stream.bases[pid].dense, against[j]), energy[j]
                if grads is not None:
                    Gg = torch.stack([grads[pid] for _, pid in group]).to(against.dtype)
                    sketch = torch.func.vmap(lambda U_, V_, g: Basis(U_, V_).project(g[None])[0])(U, V, Gg)
                    dots = (against * sketch[:, None]).sum((2, 3))  # [G, K]
                    grad_dots.update({pid: dots[j] for j, (_, pid) in enumerate(group)})
            per_micro = []
            for j in range(len(self.players.micro)):
                taken = [stream.out.get(j, {}).get(name) for name, _ in group]
                per_micro.append(None if taken[0] is None else torch.func.vmap(flat_products)(
                    torch.stack(taken).to(stream.dtype), against))
            for g, (name, _) in enumerate(group):
                out[name] = self.players.merge([None if x is None else x[g] for x in per_micro], (K,), stream.dtype,
                                               device)
        return Products(out, _DenseOnRead(used), {"energy": kept}, grad_dots if grads is not None else None), bases

    def _sketch_groups(self, W: Mapping[int, torch.Tensor]) -> list[list[tuple[str, int]]]:
        """The attributed parameters ([(name, id)]) in groups that `sketched` takes together: same W shape, same
        basis shapes, and the same sketches taken in every micro-batch."""
        items = [(name, id(p)) for name, p in self.plan.params.items()]
        if not isinstance(W, dict) or not items or not batched(self.plan.params[items[0][0]].device):
            return [[item] for item in items]
        stream, groups = self._stream, {}
        for name, pid in items:
            basis = stream.bases.get(pid)
            taken = tuple(None if (x := stream.out.get(j, {}).get(name)) is None else (x.shape, x.dtype)
                          for j in range(len(self.players.micro)))
            key = (pid in self.sketchable(), W[pid].shape, W[pid].dtype, taken,
                   None if basis is None else (basis.U.shape, basis.V.shape, basis.U.dtype))
            groups.setdefault(key, []).append((name, pid))
        return list(groups.values())

    def streamed(self) -> dict[str, torch.Tensor]:
        """The streamed products of the step: canonical name -> [players, K] (zeros where no backward
        reached a parameter)."""
        device = next(iter(self.plan.params.values())).device
        return {name: self._over_micro_batches(name, self._stream.K, device, lambda x: x)
                for name in self.plan.params}

    def _over_micro_batches(self, name, K, device, to_products) -> torch.Tensor:
        """[players, K]: `to_products` of what the backward took for `name` in each micro-batch, added into the
        players' rows (zeros where no backward reached it)."""
        stream = self._stream
        parts = [stream.out.get(j, {}).get(name) for j in range(len(self.players.micro))]
        return self.players.merge([None if x is None else to_products(x) for x in parts], (K,), stream.dtype,
                                  device)

    def products(self, W: Mapping[int, torch.Tensor], dtype: torch.dtype, rank: Optional[int] = None,
                 num_targets: Optional[int] = None) -> Products:
        """Per attributed parameter (canonical name): Tensor[players, K] of <c g_i, W_k>.

        `W` maps id(param) to [K, *param.shape]; `c g_i` is sample i's contribution to the batch
        gradient (the captured output gradients carry the loss reduction's factor).
        `rank` (Config.product_rank): matrix weights use low-rank products (ghost/lowrank.py); the returned
        `Products.W` then holds the rank-r approximations the products were taken with (every use of a tied
        weight and the completeness check see the same W), and `Products.lowrank` each layer's kept energy
        and the layers that fell back to exact. `num_targets` (K): give it when reading W is costly (a
        mapping that gathers on each read, FSDP2 / ZeRO-3); else it is read from W.
        """
        names = self._names
        K = num_targets if num_targets is not None else next(iter(W.values())).shape[0]
        device = next(iter(self.plan.params.values())).device
        parts: dict[str, list] = {n: [None] * len(self.players.micro) for n in self.plan.params}  # per micro-batch
        info, factors = {}, {}
        if rank is not None:
            W = dict(W)  # the entries the low-rank products replace; the caller's mapping is left alone
            with record_function("shardshap.products.factorize"):
                factors, info = self._factorize(W, rank, names)
        jobs = []
        for am in self.plan.modules:
            low = self._low_dtype(am)  # products in it (bf16 matrix units); the sums are kept in `dtype`
            Wm = {local: W[id(p)] for local, p in am.params.items()}
            if "weight" in am.params and id(am.params["weight"]) in factors:
                rule, f = factors[id(am.params["weight"])]
                if rule is am.rule:  # same orientation; other uses of a tied weight take the dense W_r
                    Wm["weight"] = f
            work = dtype if low is None else low
            jobs += [_Job(_as_called(am, call), call, Wm, work) for call in self.calls[am.name]]
            if not isinstance(W, dict):  # gathered on read: one module's W at a time, in plan order on every rank
                self._take_products(jobs, parts, dtype)
                jobs = []
        self._take_products(jobs, parts, dtype)
        out = {n: self.players.merge(x, (K,), dtype, device) for n, x in parts.items()}
        return Products(out, W, info)

    def _take_products(self, jobs: list["_Job"], parts: dict[str, list], dtype: torch.dtype) -> None:
        """Products of module calls, added into `parts` (canonical name -> per micro-batch [m, K]); calls that
        one batched call can take (same rule and shapes) run together."""
        device = next(iter(self.plan.params.values())).device
        for group in _batches(jobs, self.players.per_position, batched(device)):
            first = group[0]
            with record_function(f"shardshap.products.{type(first.am.rule).__name__}"):
                if len(group) == 1:
                    Wm = {local: w.to(first.work) for local, w in first.Wm.items()}
                    results = [_call_products(first.am, first.call.a, first.call.e, first.call.grads, Wm, first.work,
                                              self.players.micro[first.call.micro])]
                else:
                    results = _batched_products(group, dtype)
            mp = self.model_parallel
            for job, res in zip(group, results):
                for local, val in res.items():
                    pid = id(job.am.params[local])
                    if mp is not None and not mp.contributes(pid, job.call.token_split):
                        continue  # (whole on every model-parallel rank: rank 0's part is the one summed)
                    acc, val = parts[self._names[pid]], val.to(dtype)
                    micro = job.call.micro
                    acc[micro] = val if acc[micro] is None else acc[micro] + val

    def _factorize(self, W, rank, names) -> tuple[dict[int, tuple[ProductRule, Factors]], dict]:
        """Low-rank factors of the matrix weights (their entries of the dict `W` become the rank-r
        approximations), and what was kept per layer. A layer below MIN_ENERGY at rank r retries at
        2r, 4r, ... while that still saves work, and takes exact products if none reaches it."""
        todo = {}
        for am in self.plan.modules:
            p = am.params.get("weight")
            if p is not None and am.rule.weight_matrix is not None and id(p) in W and id(p) not in todo:
                todo[id(p)] = (am.rule, am.rule.weight_matrix(W[id(p)]))
        info = {"energy": {}, "layer_rank": {}, "exact_layers": []}
        used, r = {}, rank
        at_once = bool(todo) and batched(next(iter(todo.values()))[1].device)
        while todo:
            worth = [pid for pid, (_, M) in todo.items() if worth_it(M.shape[1], M.shape[2], r)]
            factors = factorize_all([todo[pid][1] for pid in worth], r, at_once)
            tried = {pid: (todo[pid][0], f) for pid, f in zip(worth, factors)}
            energies = torch.stack([f.energy for _, f in tried.values()]).amin(1).tolist() if tried else []
            for (pid, (rule, f)), energy in zip(tried.items(), energies):  # one host sync per round
                info["energy"][names[pid]], info["layer_rank"][names[pid]] = energy, r
                if energy >= MIN_ENERGY:
                    used[pid] = (rule, f)
                    W[pid] = rule.weight_matrix(f.dense())  # a transpose or the identity: its own inverse
                    del todo[pid]
            for pid in [pid for pid in todo if pid not in tried]:  # rank r no longer saves work: exact
                if names[pid] in info["energy"]:
                    info["exact_layers"].append(names[pid])
                    del info["layer_rank"][names[pid]]
                del todo[pid]
            r *= 2
        return used, info

    def sum_of_squares(self, wanted: set[int], dtype: torch.dtype, budget: int = 1 << 24) -> dict[int, torch.Tensor]:
        """{id(param): sum_i y_i^2} per coordinate, y_i = player i's contribution to the batch gradient
        (summed over every use of the parameter and every micro-batch). Materialises per-player gradients,
        chunk by chunk of players so that a chunk holds at most `budget` numbers per parameter."""
        uses = [(am, [local for local, p in am.params.items() if id(p) in wanted]) for am in self.plan.modules]
        uses = [(am, names) for am, names in uses if names]
        # ZeRO-3 parameters are empty outside forward (p.numel() == 0); ds_numel is their real size
        sizes = {id(p): getattr(p, "ds_numel", None) or p.numel() for am, names in uses
                 for p in (am.params[n] for n in names)}
        out = {pid: None for pid in sizes}
        chunk = max(1, budget // max(sizes.values(), default=1))
        for lo in range(0, self.players.n, chunk):
            hi = min(self.players.n, lo + chunk)
            acc: dict[int, torch.Tensor] = {}
            for micro, mp in enumerate(self.players.micro):
                chosen = [j for j, r in enumerate(mp.rows.tolist()) if lo <= r < hi]
                if not chosen:
                    continue
                into = mp.rows[chosen] - lo
                for am, names in uses:
                    for call in self.calls[am.name]:
                        if call.micro != micro:
                            continue
                        for local, g in self._player_grads(_as_called(am, call), call, names, mp, chosen,
                                                           dtype).items():
                            pid = id(am.params[local])
                            if call.token_split:  # this rank's tokens only: add the ranks' parts up
                                g = self.model_parallel.sum(g)
                            if pid not in acc:
                                acc[pid] = g.new_zeros(hi - lo, *g.shape[1:])
                            acc[pid].index_add_(0, into.to(g.device), g)
            for pid, g in acc.items():
                sq = (g * g).sum(0)
                out[pid] = sq if out[pid] is None else out[pid] + sq
        return {pid: v for pid, v in out.items() if v is not None}

    @staticmethod
    def _player_grads(am: AttributedModule, call: _Call, names: list[str], mp: MicroPlayers, chosen: list[int],
                      dtype) -> dict[str, torch.Tensor]:
        """{param: [len(chosen), *shape]}: the gradients of one call for some of its micro-batch's players."""
        pick = chosen if mp.per_position else slice(chosen[0], chosen[-1] + 1)  # (samples: a contiguous range)
        if call.grads is not None:
            return {local: call.grads[local][pick].to(dtype) for local in names}
        a, e = call.a, call.e
        if mp.per_position:  # the chosen players' tokens side by side, zero output gradient in the padding
            b, T = a.shape[:2]
            index, valid = mp.padded(T, chosen)
            index, valid = index.to(a.device), valid.to(e.device)
            a = a.reshape(b * T, *a.shape[2:])[index]
            e = e.reshape(b * T, *e.shape[2:])[index] * valid.view(*valid.shape, *(1,) * (e.dim() - 2))
        else:
            a, e = a[pick], e[pick]
        a = a.to(dtype) if a.is_floating_point() else a
        return am.rule.per_sample_grads(am.module, a, e.to(dtype), names)
