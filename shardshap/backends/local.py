"""One process, and DistributedDataParallel: every rank holds the full parameters and optimizer state.

Under DDP the gradient reaching the optimizer is the average over ranks of each rank's gradient, so
sample i on rank r contributes y_i = (its captured local contribution) / dp_size to the global
gradient, and the Shapley game is the union of all ranks' samples: a rank's values equal what one
process computes for the same global batch. What is communicated per step: one [params, 2, K] table of
per-parameter sums (the completeness check); on cold Adam steps also the global sample count and the
per-coordinate sum of squared per-sample gradients (one all-reduce the size of the model). Targets are
replicated (every rank passes the same targets; nothing is communicated) or split (each rank passes
its share; target gradients are averaged over ranks).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ghost.capture import refused_by_reentrant_checkpoint
from .base import Backend, OwnedSlice


class LocalBackend(Backend):
    """A model trained in one process (no process group: collectives are skipped)."""

    supports_hvp = True

    def __init__(self, model: nn.Module, module: nn.Module | None = None, dp_group=None):
        super().__init__(model, model if module is None else module, dp_group)

    def shards(self, optimizer, grads: bool = True) -> dict[int, OwnedSlice]:
        out = {}
        for group, p in self._covered(optimizer, grads):
            state = {k: (v.view(-1) if torch.is_tensor(v) and v.shape == p.shape else v)
                     for k, v in optimizer.state.get(p, {}).items()}
            out[id(p)] = OwnedSlice(p, p.detach().view(-1), p.grad.view(-1) if grads else None, state, group)
        return out

    def clip(self, shards: dict[int, OwnedSlice], max_norm) -> float | torch.Tensor:
        """Clip like torch.nn.utils.clip_grad_norm_ (global L2 norm)."""
        if max_norm is None:
            return 1.0
        params = [p for p in self.in_model_order(shards) if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return torch.clamp(max_norm / (total + 1e-6), max=1.0)  # (a tensor: reading it would wait on the device)

    def target_gradients(self, evaluate, params: list[nn.Parameter], dtype, split: bool = False
                         ) -> tuple[list, torch.Tensor]:
        value = evaluate()
        grads = [[] for _ in params]
        try:
            for k in range(value.numel()):
                gk = torch.autograd.grad(value[k], params, retain_graph=k < value.numel() - 1, allow_unused=True)
                for acc, g in zip(grads, gk):
                    acc.append(None if g is None else g.detach().to(dtype).reshape(-1))
        except RuntimeError as err:
            if not refused_by_reentrant_checkpoint(err):
                raise
            value, grads = self._backward_gradients(evaluate, params, dtype)
        h = [None if any(x is None for x in g) else g[0].unsqueeze(0) if len(g) == 1 else torch.stack(g)
             for g in grads]  # one target: a view, not a copy of every gradient
        value = value.detach()
        if split and self.distributed:
            h = [self.all_reduce_sum(torch.zeros(value.numel(), p.numel(), dtype=dtype, device=p.device)
                                     if x is None else x) / self.dp_size for x, p in zip(h, params)]
            value = self.all_reduce_sum(value.clone()) / self.dp_size
        return h, value

    def _backward_gradients(self, evaluate, params, dtype):
        """Target gradients by `backward()` into `.grad` (which a reentrant checkpoint accumulates into for
        every parameter it holds, whatever `inputs=` says), with the training gradients set aside and put
        back untouched; returns (losses, [[K gradients] per parameter])."""
        grads = [[] for _ in params]
        with self.gradients_set_aside() as everything:
            value = evaluate()
            for k in range(value.numel()):
                value[k].backward(retain_graph=k < value.numel() - 1)
                for acc, p in zip(grads, params):
                    acc.append(None if p.grad is None else p.grad.detach().to(dtype).reshape(-1))
                for p in everything:
                    p.grad = None
        return value, grads

    def gather(self, shard: OwnedSlice, owned: torch.Tensor) -> torch.Tensor:
        return owned.reshape(owned.shape[0], *shard.param.shape)


class DDPBackend(LocalBackend):
    """torch.nn.parallel.DistributedDataParallel over its process group."""

    def __init__(self, model: nn.parallel.DistributedDataParallel):
        super().__init__(model, model.module, model.process_group)

    def no_sync(self, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on every micro-batch but the last one."""
        return super().no_sync(last_micro_batch) if last_micro_batch else self.model.no_sync()
