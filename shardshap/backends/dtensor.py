"""Models whose parameters are DTensors: FSDP2 (`fully_shard`, also HSDP over a replicate x shard mesh), tensor
parallelism (`parallelize_module` over a model-parallel mesh dimension), and the two composed (FSDP2 over
"dp" x TP over "tp", as torchtitan lays them out). The layout is read from the DTensor placements.

- FSDP2 shards dim 0 of every parameter (of its tensor-parallel slice, under TP) over the shard ranks of the
  data-parallel mesh; each rank owns a contiguous range of it. HSDP replicates those shards over the replicate
  ranks, which see other samples.
- Tensor parallelism splits a parameter (`Shard(d)`) or replicates it (`Replicate()`, or a plain tensor)
  over the model-parallel ranks, which see the same samples. The products run on each rank's slice of the
  weights and captures and are summed over those ranks (ghost/parallel.py); W is never gathered over them.
- Shift and restore of the midpoint happen on the local shards.
- Target gradients: `autograd.grad` returns None for FSDP-sharded parameters, so each target gets an ordinary
  backward (FSDP's reduce-scatter averages the ranks' targets) with the training gradients set aside and
  put back afterwards; one forward per target.
- Each parameter's W is all-gathered over the shard ranks (padded chunks, as FSDP shards) for the products.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UnsupportedEngine
from ..ghost.parallel import ModelParallel
from .base import Backend, OwnedSlice


def _fsdp_mesh_info(model: nn.Module):
    """The data-parallel mesh of a model sharded with fully_shard (its shard and replicate dimensions), or None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                return group.mesh_info
    return None


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of piece `index` of `size` split in `parts` as torch.chunk splits (DTensor, FSDP2)."""
    step = math.ceil(size / parts)
    start = min(index * step, size)
    return start, min(step, size - start)


class DTensorBackend(Backend):
    partitioned = True

    @staticmethod
    def owns(model: nn.Module) -> bool:
        from torch.distributed.tensor import DTensor
        return any(isinstance(p, DTensor) for p in model.parameters())

    def __init__(self, model: nn.Module):
        from torch.distributed.tensor import DTensor
        dtensors = {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}
        # one mesh, or a 2-D one and the data-parallel mesh of the parameters that FSDP2 shards but TP leaves whole
        meshes = {p.device_mesh for p in dtensors.values()}
        mesh = max(meshes, key=lambda m: m.ndim)
        if any(m != mesh and not set(m.mesh_dim_names or ()) < set(mesh.mesh_dim_names or ()) for m in meshes):
            raise UnsupportedEngine(f"DTensor parameters on {len(meshes)} unrelated device meshes; shard and "
                                    "parallelise the whole model over one mesh (named dimensions, e.g. ('dp', 'tp'))")
        info = _fsdp_mesh_info(model)
        plain = [name for name, p in model.named_parameters() if name not in dtensors]
        if info is not None and plain:
            raise UnsupportedEngine(f"parameters {plain[:3]} are not sharded by fully_shard; shard the whole model "
                                    "(fully_shard on the root module too)")
        names = mesh.mesh_dim_names
        # the parameters' mesh dimensions that FSDP2 shards (and HSDP replicates) over; the rest is tensor parallel
        if info is None:
            data_dims = []
        elif info.mesh.ndim == mesh.ndim:
            data_dims = list(range(mesh.ndim))
        else:
            data_dims = [names.index(n) for n in info.mesh.mesh_dim_names]
        model_dims = [d for d in range(mesh.ndim) if d not in data_dims]
        if len(model_dims) > 1:
            raise UnsupportedEngine(f"{len(model_dims)} model-parallel mesh dimensions {[names[d] for d in model_dims]}"
                                    "; one tensor-parallel dimension is supported")
        self.mesh, self.fsdp = mesh, info
        self._tp_dim = model_dims[0] if model_dims else None
        replicate = getattr(info, "replicate_mesh_dim", None)
        self._mesh_roles = ["tp" if d == self._tp_dim else
                            "replicate" if replicate is not None and d == data_dims[replicate] else "shard"
                            for d in range(mesh.ndim)]
        self._check_placements(dtensors)
        super().__init__(model, model, self._data_parallel_group(data_dims))
        if info is not None:
            self.shard_group = info.shard_process_group
        if self._tp_dim is not None:
            self.mp_group = mesh.get_group(self._tp_dim)
            self.mp_size, self.mp_rank = dist.get_world_size(self.mp_group), dist.get_rank(self.mp_group)
        self._shard_size = dist.get_world_size(self.shard_group) if self.shard_group is not None else 1
        self._shard_rank = dist.get_rank(self.shard_group) if self.shard_group is not None else 0

    def _check_placements(self, dtensors: dict) -> None:
        from torch.distributed.tensor import Replicate, Shard
        for name, p in dtensors.items():
            for role, placement in zip(self._roles(p.device_mesh), p.placements):
                if role == "tp":
                    ok = isinstance(placement, (Replicate, Shard)) and not placement.is_partial()
                elif role == "replicate":
                    ok = isinstance(placement, Replicate)
                else:  # (FSDP2 over a tensor-parallel dim-0 split: a strided shard, whose local rows are still a chunk)
                    ok = (isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard") and \
                        placement.dim == 0
                if not ok:
                    raise UnsupportedEngine(
                        f"parameter {name} has placements {tuple(p.placements)} over mesh dimensions "
                        f"{p.device_mesh.mesh_dim_names}: supported are fully_shard's Shard(0) (Replicate() on "
                        "an HSDP replicate dimension) and a tensor-parallel Shard(d) or Replicate()")

    def _roles(self, mesh) -> list[str]:
        """Per dimension of a parameter's mesh (the model's, or its data-parallel sub-mesh): 'tp', 'shard' (FSDP2)
        or 'replicate' (HSDP)."""
        if mesh == self.mesh:
            return self._mesh_roles
        return [self._mesh_roles[self.mesh.mesh_dim_names.index(n)] for n in mesh.mesh_dim_names]

    def _data_parallel_group(self, data_dims: list[int]):
        """This rank's data-parallel group: the ranks of the mesh that differ only in the data-parallel
        dimensions (this rank alone without FSDP: the tensor-parallel ranks see the same samples)."""
        ranks = self.mesh.mesh
        if self._tp_dim is None:
            if len(data_dims) == 1:
                return self.fsdp.shard_process_group
            groups = [ranks.flatten().tolist()]  # HSDP: replicate x shard
        elif not data_dims:
            groups = [[r] for r in ranks.flatten().tolist()]
        else:  # one group per tensor-parallel index
            groups = ranks.movedim(self._tp_dim, -1).reshape(-1, self.mesh.size(self._tp_dim)).T.tolist()
        group, _ = dist.new_subgroups_by_enumeration(groups)
        return group

    # ---------------------------------------------------------------- layout of one parameter
    def _tp_placement(self, p):
        """The parameter's placement over the model-parallel ranks (Replicate for parameters TP leaves whole)."""
        from torch.distributed.tensor import DTensor, Replicate
        roles = self._roles(p.device_mesh) if isinstance(p, DTensor) else []
        return p.placements[roles.index("tp")] if "tp" in roles else Replicate()

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        """The parameter's slice on this model-parallel rank (the products' weights; the whole parameter
        without tensor parallelism)."""
        from torch.distributed.tensor import Shard
        shape = list(param.shape)
        placement = self._tp_placement(param)
        if isinstance(placement, Shard):
            dim = placement.dim % len(shape)
            shape[dim] = _chunk(shape[dim], self.mp_size, self.mp_rank)[1]
        return torch.Size(shape)

    def model_parallel(self) -> Optional[ModelParallel]:
        """What the products need of the tensor-parallel layout (None without it)."""
        from torch.distributed.tensor import Shard
        if self.mp_group is None:
            return None
        splits = {}
        for p in self.module.parameters():
            placement = self._tp_placement(p)
            if isinstance(placement, Shard):
                dim = placement.dim % p.dim()
                splits[id(p)] = (dim, *_chunk(p.shape[dim], self.mp_size, self.mp_rank))
        return ModelParallel(self.mp_rank, lambda t: self.all_reduce(t.clone(), over="mp"), splits)

    def _local(self, p, t):
        """The local tensor of `t` (a parameter, its gradient or its optimizer state) in `p`'s placements (DTensor
        may hand a gradient back in another placement, e.g. a vocabulary-split embedding's replicated one)."""
        from torch.distributed.tensor import DTensor
        if not isinstance(t, DTensor):
            return t
        if t.placements != p.placements:
            t = t.redistribute(p.device_mesh, p.placements)
        return t.to_local()

    def shards(self, optimizer, grads: bool = True) -> dict[int, OwnedSlice]:
        from torch.distributed.tensor import DTensor, Replicate
        out = {}
        for group, p in self._covered(optimizer, grads):
            with torch.no_grad():
                value = self._local(p, p.detach()).view(-1)  # a view: in-place shifts reach the sharded storage
            state = {k: (self._local(p, v).view(-1) if isinstance(v, DTensor) or
                         (torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0) else v)
                     for k, v in optimizer.state.get(p, {}).items()}
            local_shape = self.full_shape(p)
            start = 0
            if self.fsdp is not None:
                start = _chunk(local_shape[0], self._shard_size, self._shard_rank)[0] * math.prod(local_shape[1:])
            counted = self.mp_rank == 0 or not isinstance(self._tp_placement(p), Replicate)
            grad = self._local(p, p.grad).view(-1) if grads else None
            out[id(p)] = OwnedSlice(p, value, grad, state, group, start, counted)
        return out

    def clip(self, shards, max_norm) -> torch.Tensor | float:
        """Clip like torch.nn.utils.clip_grad_norm_ over the model's parameters (`clip_grad_norm_` below); the
        factor stays on the device."""
        if max_norm is None:
            return 1.0
        factor = clip_grad_norm_(self.in_model_order(shards), max_norm)[1]
        from torch.distributed.tensor import DTensor
        for sh in shards.values():  # an owned gradient in another placement than its parameter's is a copy
            grad = sh.param.grad
            if isinstance(grad, DTensor) and grad.placements != sh.param.placements:
                sh.grad = self._local(sh.param, grad).view(-1)
        return factor

    def target_gradients(self, evaluate, params, dtype, split: bool = False):
        grads = [[] for _ in params]
        with self.gradients_set_aside() as everything:
            K, value = None, None
            k = 0
            while K is None or k < K:
                v = evaluate()  # FSDP needs a fresh forward for each backward
                K, value = v.numel(), v.detach() if value is None else value
                v[k].backward()
                for acc, p in zip(grads, params):
                    g = p.grad
                    acc.append(None if g is None else self._local(p, g).detach().to(dtype).reshape(-1).clone())
                for p in everything:
                    p.grad = None
                k += 1
        h = [None if any(x is None for x in g) else torch.stack(g) for g in grads]
        # the engine averaged the gradients over the data-parallel ranks; average the reported losses the same way
        return h, self.all_reduce_sum(value.clone()) / self.dp_size

    def gather(self, shard: OwnedSlice, owned: torch.Tensor) -> torch.Tensor:
        shape = self.full_shape(shard.param)
        K = owned.shape[0]
        if self.fsdp is None:
            return owned.reshape(K, *shape)
        chunk = math.ceil(shape[0] / self._shard_size) * math.prod(shape[1:])
        padded = torch.zeros(K, chunk, dtype=owned.dtype, device=owned.device)
        padded[:, :owned.shape[1]] = owned
        parts = self.all_gather(padded, over="shard")
        return torch.cat(parts, dim=1)[:, :shape.numel()].reshape(K, *shape)


def clip_grad_norm_(parameters, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_ for parameters that are DTensors, or a mix of DTensors and plain replicated
    tensors (a tensor-parallel model with unsplit norms: their gradients join the norm as replicated DTensors);
    returns (total norm, clip factor) as plain 0-d tensors, not read back."""
    from torch.distributed.tensor import DTensor, Replicate
    params = [p for p in parameters if p.grad is not None]
    mesh = next(p.device_mesh for p in params if isinstance(p, DTensor))
    by_mesh: dict = {}  # (FSDP2 x TP: parameters that TP leaves whole live on the data-parallel mesh alone)
    for p in params:
        g = p.grad if isinstance(p.grad, DTensor) else \
            DTensor.from_local(p.grad, mesh, [Replicate()] * mesh.ndim, run_check=False)
        by_mesh.setdefault(g.device_mesh, []).append(g)
    plain = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    totals = [plain(torch.nn.utils.get_total_norm(grads)) for grads in by_mesh.values()]
    total = totals[0] if len(totals) == 1 else torch.linalg.vector_norm(torch.stack(totals))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(factor)
    return total, factor
