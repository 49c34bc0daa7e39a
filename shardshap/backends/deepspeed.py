"""DeepSpeed ZeRO stages 1, 2 and 3: `Attributor(ds_engine, None, ...)`.

Each rank owns a contiguous range of every flattened parameter (possibly empty):
- ZeRO-1/2: the flat fp32 master partition of each parameter group is cut across ranks without regard to
  parameter boundaries; `p._hp_mapping.lp_fragment_address` is the owned range of p.flatten() and
  `hp_fragment` the matching view of the fp32 master partition (None when the rank owns nothing of p).
  The model parameters that engine.module uses are full bit16/fp32 copies on every rank.
- ZeRO-3: every parameter is partitioned on its own; rank r owns [r*part, min((r+1)*part, numel)) with
  part = p.ds_tensor.numel(). Parameters below stage3_param_persistence_threshold are "persistent": their
  full value stays in p.data on every rank, their optimizer state is partitioned like the others.

What the Attributor gets:
- OwnedSlice.value: a writable view of the fp32 master values (ZeRO-1/2: hp fragment; ZeRO-3: the slice of
  fp32_partitioned_groups_flat). The midpoint shift moves it; `target_gradients` then moves what the
  forward reads (`shifted`; ZeRO-1/2: copy master -> bit16 partition + the same all-gather DeepSpeed runs after
  its step; ZeRO-3: master -> ds_tensor, persistent parameters re-gathered) and restores all of it bit-exactly.
- OwnedSlice.grad: a copy of the owned elements of the reduced (rank-averaged) gradient, clipped by `clip` with
  exactly DeepSpeed's factor (its own norm function, its own formula); DeepSpeed clips the real gradient
  in engine.step(), so nothing is clipped twice.
- OwnedSlice.state: views of exp_avg / exp_avg_sq of the inner optimizer and its `step` (empty before the first
  step: DeepSpeed creates the state lazily).
- Target gradients: engine.module(...) + torch.autograd.grad (never engine(...): its output hooks divide
  by gradient_accumulation_steps and disturb ZeRO-2/3 accumulation), restricted to the owned range.
- Micro-batches: engine.backward(loss, scale_wrt_gas=False) (the Attributor's loss already carries 1/n
  over the whole step), engine.step() after every non-final micro-batch (it only counts), and the final
  engine.step() in optimizer_step, after attribution. In a loop of the user's (the low-level API, HF Trainer)
  the user's backward and steps run as they are; attribute() comes before the boundary's engine.step().
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..errors import AttributionError, UnsupportedEngine, UnsupportedOptimizer
from .base import Backend, OwnedSlice


class ZeroBackend(Backend):
    partitioned = True
    owns_backward = True

    def __init__(self, model):
        self.ds = model
        self.zero = model.optimizer
        stage = int(model.zero_optimization_stage()) if model.zero_optimization() else 0
        if stage not in (1, 2, 3):
            raise UnsupportedEngine(f"DeepSpeed engine with ZeRO stage {stage}: shardshap supports ZeRO stages 1, 2 "
                                    "and 3 (set zero_optimization.stage)")
        if model.fp16_enabled():
            raise UnsupportedEngine("DeepSpeed fp16 (loss scaling) is not supported: the captured output gradients "
                                    "carry the dynamic loss scale; train in fp32 or bf16")
        if getattr(self.zero, "cpu_offload", False) or getattr(self.zero, "offload_optimizer", False) \
                or getattr(self.zero, "offload_param", False):
            raise UnsupportedEngine("DeepSpeed ZeRO offload is not supported (optimizer state must stay on the device)")
        super().__init__(model, model.module, self.zero.dp_process_group)
        from deepspeed.utils import groups
        if groups._get_sequence_parallel_world_size() > 1:
            if stage == 3 and getattr(self.zero, "reduce_scatter", False):
                # (its reduce-scatter path averages the gradient over the sequence ranks instead of adding their
                # tokens' parts: half the gradient at 2 ranks, measured; the contiguous all-reduce path adds them)
                raise UnsupportedEngine(
                    "DeepSpeed ZeRO-3 with sequence parallelism and zero_optimization.reduce_scatter=true averages "
                    "the gradient over the sequence-parallel ranks instead of summing their parts (DeepSpeed's "
                    "reduce-scatter path lacks the sequence-parallel factor), so the step and the values would "
                    "disagree: set \"reduce_scatter\": false in zero_optimization")
            self._sequence_parallel(groups._get_sequence_parallel_group())
        elif self.dp_size != dist.get_world_size():
            raise UnsupportedEngine(f"DeepSpeed data-parallel group of {self.dp_size} ranks in a world of "
                                    f"{dist.get_world_size()} (model parallelism): not supported yet; run data "
                                    "parallelism, with DeepSpeed-Ulysses sequence parallelism if you like")
        # ZeRO partitions over its data-parallel group: the "shard" group (with Ulysses, the sequence ranks too)
        self._part_size, self._part_rank = dist.get_world_size(self.shard_group), dist.get_rank(self.shard_group)
        self.stage = stage
        self.gas = int(model.gradient_accumulation_steps())
        self._micro = 0            # micro-batches of the current step seen so far
        self._micro_steps0 = None  # engine.micro_steps when the step started (rollback on failure)
        # every trainable parameter of engine.module, in one order shared by all ranks
        self.params: list[nn.Parameter] = [p for _, p in model.module.named_parameters() if p.requires_grad]
        if stage == 3:
            self._init_zero3()
        else:
            self._init_zero12()

    def _sequence_parallel(self, sequence_group) -> None:
        """DeepSpeed-Ulysses: the ranks of a sequence-parallel group see the same samples, each a share of their
        tokens ("mp"); ZeRO partitions over sequence x data ranks ("shard"); "dp" are the ranks with the same
        sequence-parallel index (different samples)."""
        self.mp_group = sequence_group
        self.mp_size, self.mp_rank = dist.get_world_size(sequence_group), dist.get_rank(sequence_group)
        self.partition_spans_mp = True
        everyone = self.all_gather_object(dist.get_process_group_ranks(sequence_group), over="shard")
        by_index = [[ranks[j] for ranks in dict.fromkeys(map(tuple, everyone))] for j in range(self.mp_size)]
        self.dp_group, _ = dist.new_subgroups_by_enumeration(by_index)
        self.dp_size, self.dp_rank = dist.get_world_size(self.dp_group), dist.get_rank(self.dp_group)
        # the ZeRO partition of each sequence rank (their parts of a target gradient are summed onto it)
        self._sequence_parts = [dist.get_group_rank(self.shard_group, r)
                                for r in dist.get_process_group_ranks(sequence_group)]

    def model_parallel(self):
        if self.mp_group is None:
            return None
        from ..ghost.parallel import ModelParallel
        return ModelParallel(self.mp_rank, lambda t: self.all_reduce(t.clone(), over="mp"), tokens_split=True)

    # ---------------------------------------------------------------- layout
    def _init_zero12(self):
        z = self.zero
        for i in range(len(z.bit16_groups)):
            g = z.real_dp_process_group[i]
            if dist.get_world_size(group=g) != self._part_size:
                raise UnsupportedEngine("a DeepSpeed parameter group is partitioned over a group other than the "
                                        "data-parallel group (expert parallelism); not supported")
        self.group_of = {id(p): i for i, group in enumerate(z.bit16_groups) for p in group}
        missing = [p for p in self.params if id(p) not in self.group_of]
        if missing:
            raise UnsupportedEngine(f"{len(missing)} trainable parameter(s) of engine.module are not in the DeepSpeed "
                            "optimizer; give every trainable parameter to deepspeed.initialize")
        local = []
        for p in self.params:
            hm = p._hp_mapping
            if hm is None:
                local.append((0, 0))
            else:
                a = hm.lp_fragment_address
                local.append((int(a.start), int(a.numel)))
        everyone = self.all_gather_object(local, over="shard")  # once: who owns which range of every parameter
        self.ranges = {id(p): [everyone[r][j] for r in range(self._part_size)] for j, p in enumerate(self.params)}

    def _init_zero3(self):
        for p in self.params:
            if not hasattr(p, "ds_id"):
                raise UnsupportedEngine("ZeRO-3 engine with a parameter that DeepSpeed did not partition")
            if dist.get_world_size(group=p.ds_process_group) != self._part_size:
                raise UnsupportedEngine("ZeRO-3 partition groups smaller than the data-parallel group (MiCS, hpZ) "
                                        "are not supported")
        self.ranges = {}
        for p in self.params:
            part, n = p.ds_tensor.numel(), p.ds_numel
            self.ranges[id(p)] = [(min(r * part, n), max(0, min(part, n - r * part))) for r in range(self._part_size)]

    def _owned_range(self, p) -> tuple[int, int]:
        return self.ranges[id(p)][self._part_rank]

    def full_shape(self, p) -> torch.Size:
        return p.ds_shape if self.stage == 3 else p.shape

    def _full_numel(self, p) -> int:
        return int(p.ds_numel) if self.stage == 3 else p.numel()

    # ---------------------------------------------------------------- training
    def resolve_optimizer(self, optimizer):
        if optimizer is not None and optimizer is not self.zero:
            raise UnsupportedEngine("with a DeepSpeed engine pass optimizer=None: the engine owns its optimizer "
                            "(engine.optimizer)")
        return self.zero

    def update_rule(self, optimizer):
        from ..optim import update_rule_for
        from ..optim.adam import AdamRule
        inner = optimizer.optimizer
        name = type(inner).__name__
        if name in ("FusedAdam", "DeepSpeedCPUAdam"):
            # DeepSpeed's fused/CPU Adam: the same map as torch Adam (adam_w_mode: decoupled AdamW)
            if not all(g.get("bias_correction", True) for g in inner.param_groups):
                raise UnsupportedOptimizer(f"DeepSpeed {name}(bias_correction=False) is not supported")
            if any(g.get("amsgrad", False) for g in inner.param_groups):
                raise UnsupportedOptimizer(f"DeepSpeed {name}(amsgrad=True) is not supported")
            return AdamRule(decoupled_default=bool(getattr(inner, "adam_w_mode", True)))
        return update_rule_for(inner)

    def trainable(self, optimizer) -> set[int]:
        return {id(p) for p in self.params}

    def zero_grad(self, optimizer) -> None:
        if self._micro_steps0 is not None and self._micro > 0:
            # a step failed after some micro-batches: give DeepSpeed back a clean accumulation window
            self.ds.micro_steps = self._micro_steps0
            self.zero.zero_grad(set_to_none=True)
            if hasattr(self.zero, "micro_step_id"):
                self.zero.micro_step_id = -1 if self.stage < 3 else 0
            for store in ("averaged_gradients", "all_grad_tensors"):
                d = getattr(self.zero, store, None)
                if isinstance(d, dict):
                    for k in d:
                        d[k] = None
                elif isinstance(d, list):
                    for k in range(len(d)):
                        d[k] = None
        self._micro = 0
        self._micro_steps0 = self.ds.micro_steps

    def check_before_step(self) -> None:
        if not self.ds.is_gradient_accumulation_boundary():
            raise AttributionError(
                f"attribute() under DeepSpeed: the engine is not at its accumulation boundary (micro-step "
                f"{self.ds.micro_steps}, gradient_accumulation_steps={self.gas}); call it after the backward of "
                "the step's last micro-batch, before the engine.step() that steps")

    def backward(self, loss: torch.Tensor) -> None:
        # the Attributor's loss is already this rank's share of the step (1/n over all micro-batches):
        # no further division by gradient_accumulation_steps
        self.ds.backward(loss, scale_wrt_gas=False)
        self._micro += 1

    def after_micro_batch(self, last: bool) -> None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        if last and not boundary:
            raise AttributionError(f"the step has {self._micro} micro-batch(es) but the DeepSpeed config has "
                         f"gradient_accumulation_steps={self.gas}: pass exactly that many micro-batches per step")
        if not last:
            if boundary:
                raise AttributionError(f"the step has more micro-batches than the DeepSpeed config's "
                             f"gradient_accumulation_steps={self.gas}")
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    def optimizer_step(self, optimizer) -> None:
        self.ds.step()
        self._micro = 0

    # ---------------------------------------------------------------- shards
    def shards(self, optimizer, grads: bool = True) -> dict[int, OwnedSlice]:
        return self._shards_zero3(grads) if self.stage == 3 else self._shards_zero12(grads)

    @staticmethod
    def _state_slice(state: dict, flat: torch.Tensor, start: int, numel: int) -> dict:
        return {k: (v.narrow(0, start, numel) if torch.is_tensor(v) and v.shape == flat.shape else v)
                for k, v in state.items()}

    def _shards_zero12(self, grads: bool) -> dict[int, OwnedSlice]:
        z = self.zero
        out = {}
        for p in self.params:
            i = self.group_of[id(p)]
            flat = z.single_partition_of_fp32_groups[i]
            group = z.optimizer.param_groups[i]
            state = z.optimizer.state.get(flat, {})
            hm = p._hp_mapping
            if hm is None:  # this rank owns no element of p
                empty = flat.new_empty(0)
                out[id(p)] = OwnedSlice(p, empty, empty.clone() if grads else None,
                                        self._state_slice(state, flat, 0, 0), group, 0)
                continue
            a, h = hm.lp_fragment_address, hm.hp_fragment_address
            grad = None
            if grads:
                grad = hm.get_lp_grad_fragment(p._index_in_param_group).to(torch.float32).flatten()
                if grad.numel() == p.numel() and grad.numel() != a.numel:  # a full-size accumulation buffer
                    grad = grad.narrow(0, a.start, a.numel)
                grad = grad.detach().clone()
            value = flat.narrow(0, h.start, h.numel)
            out[id(p)] = OwnedSlice(p, value, grad, self._state_slice(state, flat, h.start, h.numel),
                                    group, int(a.start))
        return out

    def _shards_zero3(self, grads: bool) -> dict[int, OwnedSlice]:
        from deepspeed.utils import safe_get_local_grad
        z = self.zero
        out = {}
        for p in self.params:
            sub, offset, _ = z.grad_position[z.get_param_id(p)]
            flat = z.fp32_partitioned_groups_flat[sub]
            group = z.optimizer.param_groups[z.sub_group_to_group_id[sub]]
            state = z.optimizer.state.get(flat, {})
            start, k = self._owned_range(p)
            grad = safe_get_local_grad(p).detach().flatten()[:k].to(torch.float32).clone() if grads else None
            out[id(p)] = OwnedSlice(p, flat.narrow(0, offset, k), grad, self._state_slice(state, flat, offset, k),
                               group, start)
        return out

    # ---------------------------------------------------------------- clipping
    def _deepspeed_norm(self) -> torch.Tensor:
        """The gradient norm DeepSpeed's step computes (its own function on its own buffers; one all-reduce)."""
        from deepspeed.runtime.utils import combine_grad_norm_groups
        z = self.zero
        if self.stage == 3:
            return combine_grad_norm_groups(z._get_norm_groups())
        return z.scaled_global_norm()

    def clip(self, shards, max_norm) -> float:
        clip_grad = float(self.ds.gradient_clipping() or 0.0)
        if max_norm is not None and (clip_grad <= 0 or abs(max_norm - clip_grad) > 1e-12 * max(1.0, clip_grad)):
            raise AttributionError(f"Config.max_grad_norm={max_norm} but the DeepSpeed config has gradient_clipping="
                         f"{clip_grad}: under DeepSpeed the engine clips; set gradient_clipping in the DeepSpeed "
                         "config and leave Config.max_grad_norm None (or equal to it)")
        if clip_grad <= 0:
            return 1.0
        loss_scale = float(getattr(self.zero, "loss_scale", 1.0))
        total = self._deepspeed_norm()
        # DeepSpeed's unscale_and_clip_grads, operation for operation: the same factor, bit for bit
        ratio = torch.clamp(((total / loss_scale) + 1e-6) / clip_grad, min=1.0)
        inv = 1. / (ratio * loss_scale)
        with torch.no_grad():
            for sh in shards.values():
                sh.grad.mul_(inv)
        return float(inv)

    # ---------------------------------------------------------------- target pass
    def _sync_forward_params(self):
        """Make the parameters engine.module's forward reads equal the (shifted) fp32 master values; returns
        a restore function, or None when nothing differs on any rank (no shift)."""
        z = self.zero
        if self.stage == 3:
            z._partition_all_parameters()  # as DeepSpeed's step does first: no stale gathered copy is read
            pairs = []
            for p in self.params:
                sub, offset, num = z.grad_position[z.get_param_id(p)]
                pairs.append((p, z.fp32_partitioned_groups_flat[sub].narrow(0, offset, num)))
            differs = any(not torch.equal(hp.to(p.ds_tensor.dtype), p.ds_tensor.data.view(-1)) for p, hp in pairs)
        else:
            pairs = []
            for i, parts in enumerate(z.parallel_partitioned_bit16_groups):
                r = dist.get_rank(group=z.real_dp_process_group[i])
                pairs.append((parts[r], z.single_partition_of_fp32_groups[i]))
            differs = any(not torch.equal(hp.to(lp.dtype), lp) for lp, hp in pairs)
        if self.all_ok(not differs, over="shard"):  # no rank's forward copies differ: nothing to sync
            return None
        with torch.no_grad():
            if self.stage == 3:
                saved = [p.ds_tensor.data.clone() for p, _ in pairs]
                for p, hp in pairs:
                    p.ds_tensor.data.view(-1).copy_(hp)
                persistent = [p for p in z.persistent_parameters]
                saved_full = [p.data.clone() for p in persistent]
                if persistent:  # full copies on every rank: gather them as DeepSpeed does after its step
                    persistent[0].all_gather(persistent)
                    for p in persistent:
                        self._count(p.ds_tensor)

                def restore():
                    z._partition_all_parameters()
                    with torch.no_grad():
                        for (p, _), s in zip(pairs, saved):
                            p.ds_tensor.data.copy_(s)
                        for p, s in zip(persistent, saved_full):
                            p.data.copy_(s)
            else:
                saved = [flat.clone() for flat in z.bit16_groups_flat]
                z.update_lp_params()  # master -> bit16 partition, then DeepSpeed's own all-gather
                for lp, _ in pairs:
                    self._count(lp)

                def restore():
                    with torch.no_grad():
                        for flat, s in zip(z.bit16_groups_flat, saved):
                            flat.copy_(s)
        return restore

    @contextmanager
    def shifted(self, shards, shifts):
        """Shift the fp32 master values, then make what the forward reads follow them (and back)."""
        with super().shifted(shards, shifts):
            restore = self._sync_forward_params()
            try:
                yield
            finally:
                if restore is not None:
                    restore()

    def target_gradients(self, evaluate, params, dtype, split: bool = False):
        value = evaluate()  # engine.module(...): DeepSpeed's training state is not touched
        K = value.numel()
        grads = [[] for _ in params]
        for k in range(K):
            # ZeRO-3 releases each layer after its backward and does not re-gather it for a second
            # backward through a retained graph: one forward per target there
            v = value if k == 0 or self.stage != 3 else evaluate()
            gk = torch.autograd.grad(v[k], params, retain_graph=self.stage != 3 and k < K - 1,
                                     allow_unused=True)
            for acc, g, p in zip(grads, gk, params):
                if g is None:
                    acc.append(None)
                    continue
                g = g.detach().reshape(-1)
                if g.numel() != self._full_numel(p):
                    raise AttributionError(f"target gradient of size {g.numel()} for a parameter of "
                                           f"{self._full_numel(p)} elements")
                if split:  # each rank evaluated its share: average the full gradient over ranks
                    g = self.all_reduce_sum(g.to(dtype).clone()) / self.dp_size
                start, n = self._owned_range(p)
                if self.mp_group is not None:  # (Ulysses: this rank's tokens' part, summed onto the owners)
                    acc.append(self._sum_onto_sequence_parts(p, g.to(dtype)))
                else:
                    acc.append(g.narrow(0, start, n).to(dtype).clone())
        h = [None if any(x is None for x in g) else torch.stack(g) for g in grads]
        value = value.detach()
        if split:
            value = self.all_reduce_sum(value.clone()) / self.dp_size
        if self.mp_group is not None:
            value = self.all_reduce(value.clone(), over="mp")
        return h, value

    def _sum_onto_sequence_parts(self, p, g: torch.Tensor) -> torch.Tensor:
        """This rank's owned range of the sum over the sequence ranks of their parts `g` (full size) of a gradient:
        one reduce-scatter, each rank sending the other ranks' ranges (not an all-reduce of the whole)."""
        ranges = [self.ranges[id(p)][r] for r in self._sequence_parts]
        width = max(n for _, n in ranges)
        parts = [torch.nn.functional.pad(g.narrow(0, start, n), (0, width - n)) for start, n in ranges]
        return self.reduce_scatter(parts, over="mp")[:self._owned_range(p)[1]].clone()

    # ---------------------------------------------------------------- communication
    def _count(self, t: torch.Tensor) -> None:
        """Count the payload of a collective DeepSpeed runs for us (its own all-gathers)."""
        self.bytes_sent += t.numel() * t.element_size()

    def gather(self, shard: OwnedSlice, owned: torch.Tensor) -> torch.Tensor:
        """[K, owned] -> [K, *full shape]: the owner broadcasts when one rank owns the whole parameter,
        else a padded all-gather of every rank's range."""
        p = shard.param
        K = owned.shape[0]
        ranges = self.ranges[id(p)]
        numel = self._full_numel(p)
        owners = [r for r, (_, n) in enumerate(ranges) if n > 0]
        if len(owners) == 1 and ranges[owners[0]][1] == numel:
            full = owned.contiguous() if self._part_rank == owners[0] else \
                torch.empty(K, numel, dtype=owned.dtype, device=owned.device)
            self.broadcast(full, src=owners[0], over="shard")
            return full.reshape(K, *self.full_shape(p))
        width = max(n for _, n in ranges)
        padded = torch.zeros(K, width, dtype=owned.dtype, device=owned.device)
        padded[:, :owned.shape[1]] = owned
        parts = self.all_gather(padded, over="shard")
        full = torch.zeros(K, numel, dtype=owned.dtype, device=owned.device)
        for (start, n), part in zip(ranges, parts):
            full[:, start:start + n] = part[:, :n]
        return full.reshape(K, *self.full_shape(p))

    def owned(self, shard: OwnedSlice, full: torch.Tensor, lead: int = 0) -> torch.Tensor:
        start, n = self._owned_range(shard.param)
        return full.reshape(*full.shape[:lead], -1).narrow(-1, start, n)
