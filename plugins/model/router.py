"""DeepSeekMoE gating with auxiliary-loss-free bias (report 2.1.2, eq. 13-16).

Affinities are sigmoids. A per-expert bias ``b_i`` is added only to *choose* experts: groups
(nodes) are ranked by the sum of their two highest biased affinities, ``topk_group`` groups are
kept, and the top-k experts are picked inside them. Gate values come from the *unbiased*
affinities of the chosen experts, normalised over those k and multiplied by the routed scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .high_precision import float32_linear


@dataclass
class Routing:
    """The router's decision for N tokens: chosen experts [N, k], their gate values [N, k],
    and all unbiased affinities [N, E] (float32; the sequence-wise balance loss uses them)."""

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


def select_experts(biased: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Node-limited top-k over biased affinities [N, E]; returns expert indices [N, k]."""
    n, e = biased.shape
    grouped = biased.view(n, n_group, e // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
    masked = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, e)
    return masked.topk(k, dim=-1).indices


class Router(nn.Module):
    """Gate weight [E, D] and the load-balancing bias (a buffer: it never receives gradients)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """``x`` [N, D] -> Routing; the gate runs in float32 (report 3.3.1)."""
        scores = float32_linear(x, self.weight).sigmoid()
        with torch.no_grad():
            indices = select_experts(scores + self.e_score_correction_bias, self.n_group, self.topk_group, self.top_k)
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(indices=indices, weights=weights * self.scale, scores=scores)
