"""Rotary position embedding for the decoupled key/query (report 2.1.1, eq. 3 and 8) with YaRN (4.3).

Rotary dimensions pair consecutive elements ``(x0, x1), (x2, x3), ...`` as in DeepSeek's code.
YaRN blends interpolated and original frequencies over a ramp between ``beta_fast`` and
``beta_slow`` rotations, and corrects the softmax temperature: ``sqrt(t) = 0.1 ln s + 1``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, YarnScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """The YaRN attention temperature term ``0.1 * mscale * ln(s) + 1`` (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, length: int) -> float:
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, base: float, yarn: YarnScaling | None) -> torch.Tensor:
    """Per-pair inverse frequencies, YaRN-corrected when ``yarn`` is given."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None:
        return freqs
    low = _correction_dim(yarn.beta_fast, dim, base, yarn.original_max_position_embeddings)
    high = _correction_dim(yarn.beta_slow, dim, base, yarn.original_max_position_embeddings)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep_original = 1 - ramp
    return freqs / yarn.factor * (1 - keep_original) + freqs * keep_original


def rotary_scale(yarn: YarnScaling) -> float:
    """The factor on cos/sin (transformers' ``attention_factor``): as given, else the ratio of the
    two mscales' temperatures when both are given, else the plain ``0.1 ln s + 1``."""
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def softmax_scale(config: ModelConfig) -> float:
    """``1/sqrt(d_h + d_h^R)``, times ``mscale_all_dim``'s temperature squared under YaRN."""
    scale = config.qk_head_dim**-0.5
    yarn = config.rope_scaling
    if yarn is not None and yarn.mscale_all_dim:
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [T, d_rope/2] for given positions, in float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        yarn = config.rope_scaling
        self.register_buffer(
            "inv_freq", inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, yarn), persistent=False
        )
        self.attention_factor = 1.0 if yarn is None else rotary_scale(yarn)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` [B, T, H, d] by the angles of position t ([T, d/2])."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
