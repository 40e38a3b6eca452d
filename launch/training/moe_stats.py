"""Per-step MoE statistics for the run's records (report 2.1.2, 4.5.2): each block's starved
experts, the router-bias trajectory gathered over the pipeline stages, and the raw MTP
cross-entropy behind the lambda-weighted term (report 2.2, eq. 25)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

STARVED_FRACTION = 0.1  # an expert below 10% of its block's mean load is starved


def starved_experts(loads: np.ndarray | torch.Tensor) -> list[int]:
    """Per MoE block [M, E]: how many experts took fewer than 0.1 x the block's mean load."""
    loads = np.asarray(loads, dtype=np.float64)
    if loads.size == 0:
        return []
    return (loads < STARVED_FRACTION * loads.mean(axis=1, keepdims=True)).sum(axis=1).astype(int).tolist()


def mtp_cross_entropy(mtp_loss: float, mtp_weight: float, mtp_depth: int) -> float | None:
    """The MTP loss is ``lambda / D * sum_k CE_k`` (eq. 25): the mean over the D depths is the
    logged term over lambda; none without MTP modules or at lambda = 0."""
    return mtp_loss / mtp_weight if mtp_weight and mtp_depth else None


@torch.no_grad()
def router_bias_stats(moe_layers, num_moe_layers: int, device: torch.device) -> dict[str, list[float]]:
    """min, max and std of every MoE block's ``e_score_correction_bias``, on every rank.

    A block lives on one pipeline stage (two ranks of a stage under DualPipe) and is replicated over
    its data/expert-parallel ranks with the same bias (every replica moves it by the same global
    loads). Each rank writes its held blocks' (-min, max, std) and -inf for the others: one MAX
    all-reduce of [M, 3] gives every block's values whichever rank holds it, however often."""
    if num_moe_layers == 0:
        return {"bias_min": [], "bias_max": [], "bias_std": []}
    stats = torch.full((num_moe_layers, 3), float("-inf"), dtype=torch.float64, device=device)
    for moe in moe_layers:
        bias = moe.gate.e_score_correction_bias.detach().double()
        stats[moe.moe_index] = torch.stack([-bias.min(), bias.max(), bias.std(unbiased=False)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    rows = stats.tolist()  # the one host read
    return {"bias_min": [-row[0] for row in rows], "bias_max": [row[1] for row in rows],
            "bias_std": [row[2] for row in rows]}
