"""Load balancing (report 2.1.2): the auxiliary-loss-free bias update, the complementary
sequence-wise balance loss (eq. 17-20), the baselines of the report's ablations (4.5.2, 4.5.3)
and the MaxVio balance metric (4.5.2).

``model.balance`` picks one strategy; ``BALANCE`` says, in this one place, what each uses:

=============  ============================  ============================================
mode           router bias b_i (eq. 16)      auxiliary loss, weight alpha
=============  ============================  ============================================
``aux_free``   +-gamma after each step       sequence-wise (eq. 17-20), alpha tiny (report)
``seq_aux``    none (gamma forced to 0)      sequence-wise, alpha as set (4.5.2 baseline)
``batch_aux``  none (gamma forced to 0)      batch-wise over the data-parallel micro-batch
                                             round (4.5.3)
``none``       none (gamma forced to 0)      none (alpha ignored)
=============  ============================  ============================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Balance:
    """What a ``model.balance`` mode uses: the post-step bias update, and which auxiliary loss
    (``"sequence"``, ``"batch"`` or None)."""

    bias: bool
    loss: str | None


BALANCE = {
    "aux_free": Balance(bias=True, loss="sequence"),
    "seq_aux": Balance(bias=False, loss="sequence"),
    "batch_aux": Balance(bias=False, loss="batch"),
    "none": Balance(bias=False, loss=None),
}


def bias_update_speed(mode: str, gamma: float) -> float:
    """The step's gamma under ``mode``: the schedule's value for ``aux_free``, else 0 (the bias stays 0)."""
    return gamma if BALANCE[mode].bias else 0.0


def _normalised_affinities(scores: torch.Tensor) -> torch.Tensor:
    """``s_i,t / sum_j s_j,t`` (eq. 19's summand)."""
    return scores / scores.sum(-1, keepdim=True)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """``L_Bal = alpha * sum_i f_i P_i`` per sequence, averaged over the batch (eq. 17-20).

    ``scores`` [B, T, N_r] are the unbiased sigmoid affinities, ``indices`` [B, T, K_r] the chosen
    experts. ``f_i = N_r / (K_r T) * #{t : i chosen at t}`` (eq. 18), ``P_i = mean_t s_i,t / sum_j s_j,t``
    (eq. 19-20). Equals ``alpha`` at perfect balance and ``alpha * N_r / K_r`` when K_r experts take
    all tokens and all affinity.
    """
    batch, seq_len, num_experts = scores.shape
    k = indices.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).sum(1)
    f = chosen * (num_experts / (k * seq_len))
    p = _normalised_affinities(scores).mean(1)
    return alpha * (f * p).sum(-1).mean()


def batch_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float,
                       reduce_counts: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The batch-wise balance loss (report 4.5.3), eq. 17-20 over all tokens of the batch:
    ``alpha * sum_i f_i P_i`` with ``f_i = N_r / (K_r T_total) * count_i``.

    ``scores`` [..., N_r], ``indices`` [..., K_r]. ``reduce_counts`` (no grad, in place, a sum) turns
    this rank's [count_0 .. count_{N_r-1}, tokens] into the data-parallel micro-batch round's, so
    ``f_i`` is global while ``P_i`` is the mean over this rank's tokens: the data-parallel mean of
    the ranks' losses (and of their gradients) is the loss of the whole round, whatever the split.
    """
    num_experts, k = scores.shape[-1], indices.shape[-1]
    flat = indices.reshape(-1)
    with torch.no_grad():
        counts = torch.cat([expert_load(flat, num_experts),
                            torch.tensor([flat.numel() // k], device=flat.device)])
        if reduce_counts is not None:
            reduce_counts(counts)
        f = counts[:-1].float() * num_experts / (k * counts[-1].float())  # no host synchronisation
    p = _normalised_affinities(scores.reshape(-1, num_experts)).mean(0)
    return alpha * (f * p).sum()


def balance_loss(mode: str, scores: torch.Tensor, indices: torch.Tensor, alpha: float,
                 reduce_counts: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """The auxiliary loss of ``mode`` (``BALANCE``) on one forward's ``scores`` [B, T, N_r] and
    ``indices`` [B, T, K_r]; None for ``none``."""
    kind = BALANCE[mode].loss
    if kind == "sequence":
        return sequence_balance_loss(scores, indices, alpha)
    if kind == "batch":
        return batch_balance_loss(scores, indices, alpha, reduce_counts)
    return None


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 [E]): what the bias update and MaxVio read. A sum into E
    slots, not ``bincount``, whose output size depends on the data (a graph break under ``torch.compile``)."""
    flat = indices.flatten()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


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
