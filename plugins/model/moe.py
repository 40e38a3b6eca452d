"""DeepSeekMoE layer (report 2.1.2, eq. 12): shared experts always on, routed experts chosen by the
aux-loss-free router and reached through a token dispatcher.

Each forward also leaves two things for the training loop, so no block has to thread them:
``balance_loss`` (this forward's auxiliary loss of ``config.balance``, eq. 17-20, taken by
``plugins.model.losses.take_balance_losses``; None without one) and ``tokens_per_expert`` (tokens
routed to each expert since the last ``plugins.model.balance.reset_expert_loads``: the load that
the bias update and MaxVio read after the optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .balance import balance_loss, expert_load
from .config import ModelConfig
from .dispatch import LocalDispatcher, TokenDispatcher
from .experts import RoutedExperts
from .mlp import SwiGLU
from .offload import HostOffload
from .recompute_state import recomputing
from .router import Router


class DeepSeekMoE(nn.Module):
    """``moe_index``: this block's position among the model's MoE blocks (main blocks, then MTP);
    the row of the [MoE blocks, experts] load matrix it fills. ``reduce_counts``: set by the
    distributed side for ``batch_aux`` (``plugins.parallel.balance_counts``), the in-place sum of the
    batch loss's counts over the data-parallel ranks, used by training forwards only."""

    def __init__(self, config: ModelConfig, moe_index: int = 0):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.balance = config.balance
        self.reduce_counts: Callable[[torch.Tensor], None] | None = None
        self.moe_index = moe_index
        self.gate = Router(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher(config.n_routed_experts)
        # integer counts: exact at any batch size, and untouched by a cast of the model to bf16
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.int64),
                             persistent=False)
        self.balance_loss: torch.Tensor | None = None
        self.weighted_combine = False  # routing weights applied before the down-projection (set_ffn_memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, D] -> [B, T, D]."""
        batch, seq_len, dim = x.shape
        tokens = x.reshape(-1, dim)
        routing = self.gate(tokens)
        dispatched = self.dispatcher.dispatch(tokens, routing, self.weighted_combine)
        routed = self.dispatcher.combine(self.experts(dispatched.rows, dispatched.counts, dispatched.row_weights,
                                                      dispatched.quantized, dispatched.to_tokens), dispatched)
        out = routed.view(batch, seq_len, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        loss = balance_loss(
            self.balance, routing.scores.view(batch, seq_len, -1), routing.indices.view(batch, seq_len, -1),
            self.alpha, self.reduce_counts if self.training else None,
        )
        # A checkpointed block's forward again in backward (train.recompute: full) runs the same ops
        # (the recomputation must save the same tensors) but counts and hands over nothing twice.
        if not recomputing():
            self.balance_loss = loss
            with torch.no_grad():
                self.tokens_per_expert += expert_load(routing.indices, self.num_experts)
        return out


def set_ffn_memory(model: nn.Module, weighted_combine: bool, swiglu_recompute: bool,
                   offload: bool = False) -> None:
    """The feed-forward layers' memory switches (``train.memory``): routing weights applied before the
    routed experts' down-projection, and every SwiGLU's output (routed, shared, dense) recomputed in
    backward (``plugins.model.swiglu_recompute``) — a dense one only where its three linears are
    plain ``nn.Linear`` modules of one kind (another backend's modules run their own autograd).
    With ``offload`` what a recomputing SwiGLU keeps goes to host memory (``plugins.model.offload``).
    Only what backward keeps, and where, changes: the values are equal up to float rounding."""
    for module in model.modules():
        if isinstance(module, DeepSeekMoE):
            module.weighted_combine = weighted_combine
            module.experts.recompute = swiglu_recompute
            module.experts.offload = HostOffload() if offload and swiglu_recompute else None
        elif isinstance(module, SwiGLU):
            linears = (module.gate_proj, module.up_proj, module.down_proj)
            same = all(isinstance(m, nn.Linear) and type(m) is type(linears[0]) for m in linears)
            module.recompute = swiglu_recompute and same
            module.offload = HostOffload() if offload and module.recompute else None
