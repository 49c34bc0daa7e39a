"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and Adam moments are DTensors
sharded on dim 0; each rank owns a contiguous range of every flattened parameter.

- Shift and restore of the midpoint happen on the local shards (FSDP unshards the shifted values).
- Target gradients: `autograd.grad` returns None for sharded parameters, so each target gets an
  ordinary backward through FSDP (its reduce-scatter averages the ranks' identical or split targets)
  with the training gradients set aside and put back afterwards; one forward per target.
- Each parameter's W is all-gathered (padded chunks, as FSDP shards) only for the products.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedEngine
from .base import Backend, OwnedSlice


def _dtensor():
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as Placement
    return DTensor, Placement


class FSDP2Backend(Backend):
    partitioned = True

    @staticmethod
    def owns(model: nn.Module) -> bool:
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            return False
        return isinstance(model, FSDPModule)

    def __init__(self, model: nn.Module):
        DTensor, Placement = _dtensor()
        meshes = set()
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor) or tuple(p.placements) != (Placement(0),):
                raise UnsupportedEngine(f"FSDP2 parameter {name} is not sharded on dim 0 over one mesh dimension "
                                        f"({getattr(p, 'placements', 'not a DTensor')}); only fully_shard's "
                                        "default layout is supported")
            meshes.add(p.device_mesh)
        if len(meshes) != 1:
            raise UnsupportedEngine(f"FSDP2 parameters on {len(meshes)} different device meshes; shard the whole "
                                    "model over one mesh")
        super().__init__(model, model, meshes.pop().get_group())

    def _chunk_rows(self, p) -> int:
        return math.ceil(p.shape[0] / self.dp_size)  # torch.chunk, as fully_shard splits dim 0

    def shards(self, optimizer, grads: bool = True) -> dict[int, OwnedSlice]:
        DTensor, _ = _dtensor()
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if (p.grad is None) if grads else not p.requires_grad:
                    continue
                with torch.no_grad():
                    value = local(p).view(-1)  # a view: in-place shifts reach FSDP's sharded storage
                state = {k: (local(v).view(-1) if isinstance(v, DTensor) else v)
                         for k, v in optimizer.state.get(p, {}).items()}
                row = math.prod(p.shape[1:])
                start = min(self.dp_rank * self._chunk_rows(p), p.shape[0]) * row
                out[id(p)] = OwnedSlice(p, value, local(p.grad).view(-1) if grads else None, state, group, start)
        return out

    def clip(self, shards, max_norm) -> float:
        if max_norm is None:
            return 1.0
        local = torch.stack([sh.grad.double().pow(2).sum() for sh in shards.values()]).sum()
        total = float(self.all_reduce_sum(local.reshape(1))[0].sqrt())
        factor = min(1.0, max_norm / (total + 1e-6))
        with torch.no_grad():
            for sh in shards.values():
                sh.grad.mul_(factor)
        return factor

    def target_gradients(self, evaluate, params, dtype, split: bool = False):
        DTensor, _ = _dtensor()
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
                    acc.append(None if g is None else
                               (g.to_local() if isinstance(g, DTensor) else g).detach().to(dtype).reshape(-1).clone())
                for p in everything:
                    p.grad = None
                k += 1
        h = [None if any(x is None for x in g) else torch.stack(g) for g in grads]
        # FSDP averaged the gradients over ranks; average the reported losses the same way
        return h, self.all_reduce_sum(value.clone()) / self.dp_size

    def gather(self, shard: OwnedSlice, owned: torch.Tensor) -> torch.Tensor:
        p = shard.param
        row = math.prod(p.shape[1:])
        chunk = self._chunk_rows(p) * row
        K = owned.shape[0]
        padded = torch.zeros(K, chunk, dtype=owned.dtype, device=owned.device)
        padded[:, :owned.shape[1]] = owned
        parts = self.all_gather(padded)
        return torch.cat(parts, dim=1)[:, :p.numel()].reshape(K, *p.shape)
