"""Token dispatchers (report 2.1.2, eq. 12): how a DeepSeekMoE layer's tokens reach its routed
experts and come back. ``dispatch`` turns token rows and the router's choice into rows sorted by
(local) expert; ``combine`` turns the experts' outputs back into per-token gate-weighted sums.
Every token keeps all of its k experts: no capacity, no dropping.

With ``weighted`` (``train.memory.weighted_combine``) ``dispatch`` also hands each row its routing
weight, which the experts apply before their down-projection; ``combine`` then sums the rows as
they are, so its backward keeps no expert output. With a ``quantize`` set (``train.memory.
fp8_dispatch``, report 3.3.3) the tokens are quantized once, before they are permuted and sent,
and the experts take the E4M3 rows as their GEMM's input (``Dispatched.quantized``); the rows'
gradient comes back in the activations' dtype (``to_tokens``), the combine stays in it too.

``LocalDispatcher`` permutes within the process (all experts are here). Expert parallelism
swaps in ``plugins.parallel.expert.AllToAllDispatcher`` with the same two calls, chosen when the
model is set up, never by a branch in the layer; the two calls are separate so a pipeline
schedule can overlap one micro-batch's exchange with another's computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .balance import expert_load
from .router import Routing


@dataclass
class Permutation:
    """Rows of the expert-sorted buffer: ``token_index[j]`` is the token of row j, ``slot_order[j]``
    its flattened (token, slot) position; ``counts[e]`` rows belong to expert e, in expert order."""

    token_index: torch.Tensor
    slot_order: torch.Tensor
    counts: torch.Tensor


def permutation(indices: torch.Tensor, num_experts: int) -> Permutation:
    """The expert-sorted order of the (token, slot) pairs of a routing decision [N, k]."""
    flat = indices.flatten()
    slot_order = flat.argsort(stable=True)
    return Permutation(slot_order // indices.shape[1], slot_order, expert_load(flat, num_experts))


def permute(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Token rows [N, D] -> expert-sorted rows [N*k, D]. ``index_select``, not ``x[index]``: its
    backward (``index_add``) sums a token's k gradient rows in a fixed order, where the advanced
    index's (``index_put_`` with accumulate) varies run to run on a multi-threaded CPU."""
    return x.index_select(0, perm.token_index)


def permute_rows(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """``permute`` of a tensor without autograd, float8 included (moved as bytes)."""
    if x.element_size() == 1 and x.is_floating_point():
        return x.view(torch.uint8).index_select(0, perm.token_index).view(x.dtype)
    return x.index_select(0, perm.token_index)


def row_weights(weights: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """The routing weight [N, k] of each expert-sorted row: [N*k]."""
    return weights.flatten().index_select(0, perm.slot_order)


class _SumRows(torch.autograd.Function):
    """``out[index[j]] += y[j]`` into ``num_tokens`` zero rows; its backward is ``grad[index]`` and keeps
    only the index (autograd's ``index_add`` keeps its whole source for the gradient's shape)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return y.new_zeros(num_tokens, y.shape[-1]).index_add_(0, index, y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def unpermute(y: torch.Tensor, weights: torch.Tensor | None, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """Expert-sorted outputs [N*k, D] -> per-token gate-weighted sums [N, D] (in ``y``'s dtype);
    ``weights`` None: rows the experts weighted already, summed as they are (keeping none of them)."""
    if weights is None:
        return _SumRows.apply(y, perm.token_index, num_tokens)
    out = torch.zeros(num_tokens, y.shape[-1], dtype=y.dtype, device=y.device)
    gate = weights.flatten()[perm.slot_order].unsqueeze(-1)
    return out.index_add(0, perm.token_index, (y.float() * gate).to(y.dtype))


@dataclass
class Dispatched:
    """What ``dispatch`` hands the experts (``rows`` sorted by local expert, ``counts`` per local
    expert, each row's routing weight when weighted) and what ``combine`` needs to bring their
    outputs back (``state``). Under FP8 dispatch ``quantized`` holds the rows as E4M3 tiles
    (data, scales), ``rows`` is the tokens they came from and ``to_tokens`` maps the rows' gradient
    to the tokens'."""

    rows: torch.Tensor
    counts: torch.Tensor
    state: object
    row_weights: torch.Tensor | None = None
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None
    to_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None


class TokenDispatcher:
    """The interface DeepSeekMoE calls. ``quantize``: tokens [N, D] -> their E4M3 1x128 tiles (data,
    scales), set for FP8 dispatch (``plugins.precision.policy.dispatch_in_fp8``)."""

    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def dispatch(self, tokens: torch.Tensor, routing: Routing, weighted: bool = False) -> Dispatched:
        raise NotImplementedError

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """All ``num_experts`` experts live in this process: a permutation and its inverse."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, tokens: torch.Tensor, routing: Routing, weighted: bool = False) -> Dispatched:
        perm = permutation(routing.indices, self.num_experts)
        state = (perm, None if weighted else routing.weights, tokens.shape[0])
        weights = row_weights(routing.weights, perm) if weighted else None
        if self.quantize is None:
            return Dispatched(permute(tokens, perm), perm.counts, state, weights)
        quantized = tuple(permute_rows(t, perm) for t in self.quantize(tokens.detach()))

        def to_tokens(grad: torch.Tensor) -> torch.Tensor:
            return grad.new_zeros(tokens.shape).index_add_(0, perm.token_index, grad)

        return Dispatched(tokens, perm.counts, state, weights, quantized, to_tokens)

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        perm, weights, num_tokens = dispatched.state
        return unpermute(expert_output, weights, perm, num_tokens)
