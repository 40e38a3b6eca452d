"""DeepSeekMoE layer (report 2.1.2, eq. 12): shared experts always on, routed experts by the
aux-loss-free router, plus the sequence-wise balance loss and this step's per-expert load."""

from __future__ import annotations

import torch
from torch import nn

from .balance import expert_load, sequence_balance_loss
from .config import ModelConfig
from .expert_parallel import ExpertExchange
from .experts import RoutedExperts, combine, dispatch, plan_dispatch
from .mlp import SwiGLU
from .router import Router


class DeepSeekMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.gate = Router(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.exchange: ExpertExchange | None = None  # set by shard_experts: experts live on other ranks too

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, T, D] -> (output [B, T, D], balance loss (scalar), expert load [E])."""
        batch, seq_len, dim = x.shape
        tokens = x.reshape(-1, dim)
        routing = self.gate(tokens)
        plan = plan_dispatch(routing.indices, self.num_experts)
        rows = dispatch(tokens, plan)
        if self.exchange is None:
            routed = self.experts(rows, plan.counts)
        else:
            self.exchange.observe(routing.indices)
            local_rows, exchange = self.exchange.dispatch(rows, plan.counts)
            routed = self.exchange.combine(self.experts(local_rows, exchange.local_counts), exchange)
        out = combine(routed, routing.weights, plan, tokens.shape[0]).view(batch, seq_len, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        balance = sequence_balance_loss(
            routing.scores.view(batch, seq_len, -1), routing.indices.view(batch, seq_len, -1), self.alpha
        )
        return out, balance, expert_load(routing.indices, self.num_experts)


def shard_experts(model: nn.Module, exchange: ExpertExchange) -> None:
    """Keep only this rank's routed experts in every DeepSeekMoE of ``model`` (report 3.2.2); the
    rest are reached through ``exchange``. Parameters become new, smaller tensors (copies of the
    local slice), so call this before an optimizer sees them."""
    for moe in (m for m in model.modules() if isinstance(m, DeepSeekMoE)):
        experts = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, nn.Parameter(getattr(experts, name).data[exchange.local_slice].clone()))
        experts.num_experts = exchange.local_experts
        moe.exchange = exchange
