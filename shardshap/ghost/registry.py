"""Per-module product rules behind a registry (one small file per module kind, like Opacus).

A rule computes, for every sample i of a batch and every target k, the exact product
<grad_theta l_i, W_k> restricted to the module's own parameters, from what one ordinary backward
already produces: the module's input `a` and the gradient `e` of the loss at its output.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class ProductRule:
    """Base class of a product rule. Subclasses set `param_names` and implement `products`."""

    param_names: tuple[str, ...] = ("weight", "bias")
    # products are matrix multiplications that bf16 matrix units speed up (Config.cache_dtype applies)
    low_precision_pays: bool = False
    # per-sample gradients no larger than one token's activations (norm layers: [b, d]): taken in the
    # backward hook while the output gradient is hot, and kept instead of the input and output gradient
    reduce_in_backward: bool = False
    # per-sample gradient = a sum over tokens of terms of one token's (input, output gradient) each: the
    # rule then serves per-position sample_ids (ghost/players.py), every token taken as a sample of its own
    tokenwise: bool = False
    # `products` reads nothing of the module but its arguments' shapes, so that the calls of several modules
    # with the same shapes run as one batched call (torch.func.vmap over the stacked calls: a few kernels
    # for a whole group of layers instead of a few per layer)
    batchable: bool = False

    # weight_matrix(W [K, *weight.shape]) -> [K, d_out, d_in] view, its own inverse: defined by rules whose
    # weight is a matrix map (Linear, HF Conv1D) so that low rank (Config.product_rank) can factorise W
    weight_matrix: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    # parameters whose per-sample gradient is a sum of token outer products in the parameter's own shape
    # [m, n], which `sketch` compresses (schedule="streaming", stream_predictor="subspace")
    sketched: tuple[str, ...] = ()

    def validate(self, module: nn.Module, name: str) -> None:
        """Raise for module options the rule does not support (checked once, before training)."""

    def per_sample_view(self, module: nn.Module, args: tuple, output, batch_size: int):
        """For a module called once for the whole batch (leading dimension 1, broadcast by its consumer):
        return (input, output) expanded to the batch, or None. The expanded output replaces the module's
        output, so the gradient reaching the module is summed over the batch exactly as the broadcast
        did (training unchanged), while its per-sample slices stay apart for the products."""
        return None

    def local_view(self, module: nn.Module, a: torch.Tensor, e: torch.Tensor,
                   splits: dict[str, tuple[int, int, int]]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """Tensor parallelism: (module, a, e) as this rank's slice of the module, whose parameters named in
        `splits` are this rank's (dim, start, length) slices. The default fits layers whose local captures
        meet their local weights as they are (a column-split Linear's output gradient holds its own output
        features, a row-split one's input its own input features)."""
        return module, a, e

    def products(self, module: nn.Module, a: torch.Tensor, e: torch.Tensor,
                 W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{param name: Tensor[b, K]} = <per-sample gradient of that parameter, W[name][k]>.

        `a` is the module input, `e` the gradient at its output, both with the batch first and cast to
        the compute dtype; W[name] has shape [K, *param.shape]; only the names in W are computed.
        The default goes through `per_sample_grads`: right only where those are small (norm layers).
        """
        return grads_products(self.per_sample_grads(module, a, e, list(W)), W)

    def sketch(self, module: nn.Module, a: torch.Tensor, e: torch.Tensor, U: torch.Tensor,
               V: torch.Tensor) -> torch.Tensor:
        """[b, p, q] = U^T G_i V for the per-sample gradient G_i ([m, n], the weight's own shape) of the
        parameter named in `sketched`, for orthonormal U [m, p] and V [n, q] (ghost/sketch.py)."""
        raise NotImplementedError

    def per_sample_grads(self, module: nn.Module, a: torch.Tensor, e: torch.Tensor,
                         names: list[str]) -> dict[str, torch.Tensor]:
        """{param name: Tensor[b, *param.shape]}: the per-sample gradients themselves (materialised; used
        only where exact per-coordinate sums of squares are needed, e.g. cold Adam steps, in chunks)."""
        raise NotImplementedError


_BY_TYPE: dict[type, ProductRule] = {}
_BY_MATCH: list[tuple[Callable[[nn.Module], bool], ProductRule]] = []


def register(*module_types: type, match: Optional[Callable[[nn.Module], bool]] = None):
    """Class decorator: register a rule for module types (subclasses included) and/or a predicate."""
    def deco(rule_cls):
        rule = rule_cls()
        for t in module_types:
            _BY_TYPE[t] = rule
        if match is not None:
            _BY_MATCH.append((match, rule))
        return rule_cls
    return deco


def product_rule_for(module: nn.Module) -> Optional[ProductRule]:
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    for match, rule in _BY_MATCH:
        if match(module):
            return rule
    return None


def bias_products(e_tokens: torch.Tensor, Wb: torch.Tensor) -> torch.Tensor:
    """sum_t e_{i,t} . W_b,k for e [b, T, d] and W_b [K, d]."""
    return e_tokens.sum(1) @ Wb.reshape(Wb.shape[0], -1).T


def grads_products(grads: dict[str, torch.Tensor], W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: [b, K]} = <per-sample gradient [b, *shape], W[name][k]> for materialised per-sample gradients."""
    return {name: g.reshape(g.shape[0], -1).to(W[name].dtype) @ W[name].reshape(W[name].shape[0], -1).T
            for name, g in grads.items() if name in W}
