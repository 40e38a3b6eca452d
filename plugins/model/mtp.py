"""Multi-Token Prediction (report 2.2, eq. 21-25).

Module k combines the previous depth's hidden state at position i with the embedding of token
i+k: ``h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]`` (the concatenation order of
DeepSeek's published ``eh_proj`` weights), runs one transformer block, and predicts t_{i+k+1}
through the shared output head after its own final RMSNorm. Embedding and head are the main
model's (passed in, never copied). Sequences keep their length T: the last k positions have
no target and, being last under causal attention, cannot influence the others.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import DecoderLayer
from .config import ModelConfig
from .mla import LatentCache
from .norm import RMSNorm

IGNORE_INDEX = -100


def shift_left(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """``t`` [B, T] shifted left by k along time, the last k entries set to ``fill``."""
    out = torch.full_like(t, fill)
    out[:, : t.shape[1] - k] = t[:, k:]
    return out


def mtp_targets(labels: torch.Tensor, k: int, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets of depth k: position i predicts ``labels[i+k]`` (token t_{i+k+1}); -100 past the
    end and wherever token i+k belongs to another packed document than token i."""
    targets = shift_left(labels, k, IGNORE_INDEX)
    if document_ids is not None:
        same_doc = document_ids == shift_left(document_ids, k, -1)
        targets = targets.masked_fill(~same_doc, IGNORE_INDEX)
    return targets


class MTPModule(nn.Module):
    """Depth-k module; submodule names follow DeepSeek's published MTP layer (``enorm``, ``hnorm``,
    ``eh_proj``, the block, ``shared_head.norm`` as ``norm``)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        ahead_embeds: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """Returns ``h^k`` (before the final norm; the next depth's input). With ``cache`` the
        block attends over its own earlier positions (speculative drafting)."""
        h = self.eh_proj(torch.cat([self.enorm(ahead_embeds), self.hnorm(h_prev)], dim=-1))
        return self.block(h, rope, cache)
