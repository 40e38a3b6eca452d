"""Expert parallelism (report 3.2.2): each of the ``size`` ranks of an expert-parallel group holds
``n_routed_experts / size`` consecutive routed experts. After routing, a rank's expert-sorted rows
are sent to the ranks that hold their experts with one variable-split all-to-all (the per-expert
counts are exchanged first: no capacity, no dropped token), computed by the local experts in one
grouped computation, and sent back by the reverse all-to-all before the gate-weighted combine.

``AllToAllDispatcher`` is the token dispatcher DeepSeekMoE calls under expert parallelism
(``apply_expert_parallel`` installs it and keeps each rank's experts); its ``dispatch`` and
``combine`` are separate calls so a pipeline schedule can overlap one micro-batch's exchange with
another's computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.dispatch import Dispatched, TokenDispatcher, permutation, permute, permute_rows, row_weights, unpermute
from ..model.moe import DeepSeekMoE
from ..model.recompute_state import recomputing
from ..model.router import Routing
from ..progress import waiting
from .streams import communication

# The graph breaks an expert-parallel DeepSeekMoE block keeps under torch.compile, and why.
COMPILE_BREAKS = {
    "dispatch": "all_to_all_single takes its split sizes as Python ints, read to the host from the exchanged "
                "per-expert counts; the variable-size rows it returns size the rest of the block",
    "combine": "the reverse all-to-all, with the same host-read split sizes, back to the tokens' ranks",
}


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits whose backward is the reverse exchange, issued on
    ``backward_group`` (the same ranks; a group of its own lets a pipeline run one micro-batch's
    backward exchange while another's forward exchange is in flight)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                backward_group) -> torch.Tensor:
        ctx.splits, ctx.groups = (send_splits, recv_splits), (group, backward_group)
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        rows = rows.contiguous()
        with waiting("expert all-to-all"), communication(rows, out):
            dist.all_to_all_single(out, rows, recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        group, backward_group = ctx.groups
        return _AllToAll.apply(grad, recv_splits, send_splits, backward_group, group), None, None, None, None


@dataclass
class ExchangePlan:
    """One exchange's bookkeeping: rows sent to / received from each rank, the permutation that turns
    received rows (source-major) into local-expert-major order, and the rows of each local expert."""

    send_splits: list[int]
    recv_splits: list[int]
    order: torch.Tensor
    local_counts: torch.Tensor


class ExpertExchange:
    """Moves expert-sorted token rows between the ranks of one expert-parallel group (gloo or NCCL).
    ``backward_group``: the same ranks in another group for the backward exchanges (default: ``group``);
    ``nodes``: the node of each rank of the group (default: one node), for the destination statistics."""

    def __init__(self, group: dist.ProcessGroup | None, num_experts: int,
                 backward_group: dist.ProcessGroup | None = None, nodes: list[int] | None = None):
        self.group = group
        self.backward_group = group if backward_group is None else backward_group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"{num_experts} routed experts do not divide over {self.size} expert-parallel ranks")
        self.local_experts = num_experts // self.size
        self.nodes = torch.tensor(nodes if nodes is not None else [0] * self.size)
        # tokens seen; sum and max of their distinct destination ranks; sum and max of their nodes
        self.statistics: torch.Tensor | None = None

    def observe(self, indices: torch.Tensor) -> None:
        """Count, for the tokens of one routing decision [N, k], how many ranks and nodes each one
        reaches (kept on the device: no host synchronisation per block)."""
        if not indices.numel():
            return
        rank_of = torch.arange(self.size, device=indices.device).repeat_interleave(self.local_experts)
        ranks = distinct_destinations(indices, rank_of).float()
        nodes = distinct_destinations(indices, self.nodes.to(indices.device)[rank_of]).float()
        step = torch.stack([torch.tensor(float(len(ranks)), device=ranks.device), ranks.sum(), ranks.max(),
                            nodes.sum(), nodes.max()])
        if self.statistics is None:
            self.statistics = step
        else:
            self.statistics = torch.cat([self.statistics[:2] + step[:2], self.statistics[2:3].maximum(step[2:3]),
                                         self.statistics[3:4] + step[3:4], self.statistics[4:].maximum(step[4:])])

    def take_statistics(self, device: torch.device) -> torch.Tensor:
        """[tokens, sum, max of destination ranks, sum, max of destination nodes] since the last
        call (zeros if none); resets them."""
        taken, self.statistics = self.statistics, None
        return torch.zeros(5, device=device) if taken is None else taken.to(device)

    @property
    def local_slice(self) -> slice:
        """The global experts this rank holds."""
        return slice(self.rank * self.local_experts, (self.rank + 1) * self.local_experts)

    def plan(self, counts: torch.Tensor) -> ExchangePlan:
        """From this rank's rows per global expert [E]: rows sent to / received from each rank and the
        order that turns received rows local-expert-major (exchanges the counts first)."""
        by_rank = counts.view(self.size, self.local_experts)
        received_counts, by_rank = torch.empty_like(by_rank), by_rank.contiguous()
        with waiting("expert all-to-all"), communication(by_rank, received_counts):
            dist.all_to_all_single(received_counts, by_rank, group=self.group)
        flat = received_counts.flatten()  # source-major blocks of local experts
        expert = torch.arange(self.local_experts, device=counts.device).repeat(self.size)
        source = torch.arange(self.size, device=counts.device).repeat_interleave(self.local_experts)
        key = torch.repeat_interleave(expert * self.size + source, flat)
        # the split sizes to the host, both in one read: all_to_all_single takes them as Python ints
        send_splits, recv_splits = torch.stack([by_rank.sum(1), received_counts.sum(1)]).tolist()
        return ExchangePlan(send_splits, recv_splits, key.argsort(stable=True), received_counts.sum(0))

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ExchangePlan]:
        """``rows`` [M, D] sorted by global expert with ``counts`` [E] -> this rank's experts' rows
        from every rank, sorted by local expert, and the plan that sends their outputs back."""
        plan = self.plan(counts)
        return self.send_rows(rows, plan), plan

    def send_quantized(self, tiles: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """``send_rows`` without autograd for E4M3 data (sent as bytes) or their scales."""
        payload = tiles.view(torch.uint8) if tiles.element_size() == 1 else tiles
        out, payload = payload.new_empty(sum(plan.recv_splits), *payload.shape[1:]), payload.contiguous()
        with waiting("expert all-to-all"), communication(payload, out):
            dist.all_to_all_single(out, payload, plan.recv_splits, plan.send_splits, group=self.group)
        return out[plan.order].view(tiles.dtype)

    def return_gradient(self, grad: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """The gradient of rows sent with ``send_quantized`` back to the ranks that sent them, in
        their expert-sorted order (the backward exchange's group)."""
        source_major = grad[plan.order.argsort()].contiguous()
        out = grad.new_empty(sum(plan.send_splits), *grad.shape[1:])
        with waiting("expert all-to-all"), communication(source_major, out):
            dist.all_to_all_single(out, source_major, plan.send_splits, plan.recv_splits, group=self.backward_group)
        return out

    def send_rows(self, rows: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """Rows [M, ...] in this rank's expert-sorted order -> the rows of this rank's experts, sorted by
        local expert, along ``plan`` (the token rows, and their routing weights with them)."""
        received = _AllToAll.apply(rows, plan.send_splits, plan.recv_splits, self.group, self.backward_group)
        return received[plan.order]

    def combine(self, outputs: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """The local experts' outputs (local-expert-major) -> this rank's rows, in its original order."""
        source_major = outputs[plan.order.argsort()]
        return _AllToAll.apply(source_major, plan.recv_splits, plan.send_splits, self.group, self.backward_group)


def distinct_destinations(indices: torch.Tensor, destinations: torch.Tensor) -> torch.Tensor:
    """Per token, how many different ranks its chosen experts live on (node-limited routing bounds
    it by ``topk_group`` when groups align with ranks)."""
    ranks = destinations[indices]  # [N, k]
    sorted_ranks = ranks.sort(dim=-1).values
    return 1 + (sorted_ranks[:, 1:] != sorted_ranks[:, :-1]).sum(-1)


class AllToAllDispatcher(TokenDispatcher):
    """Local permutation by global expert, then the exchange to the experts' ranks; ``combine``
    reverses both. One exchange (and its destination statistics) serves every MoE block.

    Under ``torch.compile`` both calls run eagerly: the two graph breaks of an expert-parallel MoE
    block (``COMPILE_BREAKS``)."""

    def __init__(self, exchange: ExpertExchange, num_experts: int):
        self.exchange, self.num_experts = exchange, num_experts

    @torch.compiler.disable
    def dispatch(self, tokens: torch.Tensor, routing: Routing, weighted: bool = False) -> Dispatched:
        perm = permutation(routing.indices, self.num_experts)
        if not recomputing():  # a checkpointed block's forward again (train.recompute: full) is not new traffic
            self.exchange.observe(routing.indices)
        state_weights = None if weighted else routing.weights
        if self.quantize is None:
            local_rows, plan = self.exchange.dispatch(permute(tokens, perm), perm.counts)
        else:  # E4M3 tiles over the wire (report 3.3.3), the gradient back in the activations' dtype
            plan = self.exchange.plan(perm.counts)
            quantized = tuple(self.exchange.send_quantized(permute_rows(t, perm), plan)
                              for t in self.quantize(tokens.detach()))
        weights = self.exchange.send_rows(row_weights(routing.weights, perm), plan) if weighted else None
        state = (perm, plan, state_weights, tokens.shape[0])
        if self.quantize is None:
            return Dispatched(local_rows, plan.local_counts, state, weights)

        def to_tokens(grad: torch.Tensor) -> torch.Tensor:
            rows = self.exchange.return_gradient(grad, plan)
            return rows.new_zeros(tokens.shape).index_add_(0, perm.token_index, rows)

        return Dispatched(tokens, plan.local_counts, state, weights, quantized, to_tokens)

    @torch.compiler.disable
    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        perm, plan, weights, num_tokens = dispatched.state
        return unpermute(self.exchange.combine(expert_output, plan), weights, perm, num_tokens)


def keep_experts(model: nn.Module, experts: slice) -> list[nn.Parameter]:
    """Keep only the routed experts ``experts`` (global indices) in every DeepSeekMoE of ``model``;
    the banks become new, smaller tensors (copies of the slice; free on the ``meta`` device).
    Returns the expert parameters."""
    params = []
    for moe in (m for m in model.modules() if isinstance(m, DeepSeekMoE)):
        bank = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            setattr(bank, name, nn.Parameter(getattr(bank, name).data[experts].clone()))
            params.append(getattr(bank, name))
        bank.num_experts = experts.stop - experts.start
    return params


def apply_expert_parallel(model: nn.Module, exchange: ExpertExchange) -> list[nn.Parameter]:
    """Keep only this rank's routed experts in every DeepSeekMoE of ``model`` and route their
    tokens through ``exchange``. Call this before an optimizer sees the parameters. Returns the
    expert parameters."""
    params = keep_experts(model, exchange.local_slice)
    for moe in (m for m in model.modules() if isinstance(m, DeepSeekMoE)):
        moe.dispatcher = AllToAllDispatcher(exchange, moe.num_experts)
    return params
