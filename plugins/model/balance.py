"""Load balancing (report 2.1.2): the auxiliary-loss-free bias update, the complementary
sequence-wise balance loss (eq. 17-20) and the MaxVio balance metric (4.5.2)."""

from __future__ import annotations

import torch


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """``L_Bal = alpha * sum_i f_i P_i`` per sequence, averaged over the batch.

    ``scores`` [B, T, N_r] are the unbiased sigmoid affinities, ``indices`` [B, T, K_r] the chosen
    experts. ``f_i = N_r / (K_r T) * #{t : i chosen at t}``, ``P_i = mean_t s_i,t / sum_j s_j,t``.
    Equals ``alpha`` at perfect balance and ``alpha * N_r / K_r`` when K_r experts take all tokens
    and all affinity.
    """
    batch, seq_len, num_experts = scores.shape
    k = indices.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).sum(1)
    f = chosen * (num_experts / (k * seq_len))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return alpha * (f * p).sum(-1).mean()


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 [E]): what the bias update and MaxVio read."""
    return torch.bincount(indices.flatten(), minlength=num_experts)


@torch.no_grad()
def update_router_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """``b_i += gamma * sign(mean(load) - load_i)``: overloaded experts are chosen less next step.

    ``load`` must be the whole batch's load (all-reduced over data/expert ranks by the caller).
    """
    load = load.to(bias.dtype)
    bias.add_(gamma * torch.sign(load.mean() - load))


# The step's load accounting, one mechanism for every layout: each DeepSeekMoE counts its tokens
# in ``tokens_per_expert``; after the micro-batches of a step the trainer collects the held
# blocks' counts into the [MoE blocks, experts] matrix, sums it over all ranks, and applies it.
def reset_expert_loads(moe_layers) -> None:
    """Zero every block's counts; also gives them storage after a model was built on ``meta``."""
    for moe in moe_layers:
        if moe.tokens_per_expert.is_meta:
            moe.tokens_per_expert = torch.zeros_like(moe.tokens_per_expert, device="cpu")
        moe.tokens_per_expert.zero_()


def collect_expert_loads(moe_layers, num_moe_layers: int, num_experts: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [M, E]: the held blocks' counts in their rows, zeros for blocks held elsewhere (every
    rank contributes the same shape to the sum, also a pipeline rank without MoE blocks)."""
    loads = torch.zeros(num_moe_layers, num_experts, device=device)
    for moe in moe_layers:
        loads[moe.moe_index] = moe.tokens_per_expert.float()
    return loads


def update_router_biases(moe_layers, global_loads: torch.Tensor, gamma: float) -> None:
    """The post-step bias update of every held block from the whole batch's loads [M, E]; resets the counts."""
    for moe in moe_layers:
        update_router_bias(moe.gate.e_score_correction_bias, global_loads[moe.moe_index], gamma)
    reset_expert_loads(moe_layers)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load over the last dimension (0 = perfect balance)."""
    load = load.float()
    mean = load.mean(-1)
    return (load.max(-1).values - mean) / mean.clamp_min(1e-12)
