"""One pre-norm transformer block: MLA, then a dense SwiGLU FFN or DeepSeekMoE (report 2.1)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .mla import LatentCache, MultiHeadLatentAttention
from .mlp import SwiGLU
from .moe import DeepSeekMoE
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(config, moe_index=layer_idx - config.first_k_dense_replace)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: LatentCache | None = None
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
