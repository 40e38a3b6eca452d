"""Multi-head Latent Attention (report 2.1.1, eq. 1-11).

Queries go through a low-rank down-projection, RMSNorm and up-projection. Keys and values share
one compressed latent ``c_kv`` (RMSNorm'd) plus a decoupled RoPE key ``k_pe`` shared by all heads.
Training runs the expanded form through ``scaled_dot_product_attention``; inference with a
``LatentCache`` keeps only ``c_kv`` and ``k_pe`` per token and absorbs the key/value
up-projections into the query and output (the weight-absorbed form of DeepSeek's code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary, softmax_scale


class LatentCache:
    """Per-layer cache of the normalised latent ``c_kv`` [B, S, r] and the rotated ``k_pe`` [B, S, d_R]."""

    def __init__(self, num_layers: int):
        self.latents: list[torch.Tensor | None] = [None] * num_layers
        self.rope_keys: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        first = self.latents[0]
        return 0 if first is None else first.shape[1]

    def truncate(self, length: int, layers: range) -> None:
        """Forget every position from ``length`` on in ``layers`` (rejected speculative tokens)."""
        for layer in layers:
            self.latents[layer] = self.latents[layer][:, :length]
            self.rope_keys[layer] = self.rope_keys[layer][:, :length]

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latents[layer] is not None:
            c_kv = torch.cat([self.latents[layer], c_kv], dim=1)
            k_pe = torch.cat([self.rope_keys[layer], k_pe], dim=1)
        self.latents[layer], self.rope_keys[layer] = c_kv, k_pe
        return c_kv, k_pe


class MultiHeadLatentAttention(nn.Module):
    """MLA; parameter names follow HF ``DeepseekV3Attention`` so checkpoints map one to one."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.scale = softmax_scale(config)
        q_out = self.num_heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, config.hidden_size, bias=False)

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The down-projections: the query latent before its norm (``x`` itself without q
        compression) and ``[c_kv | k_pe]`` before the norm and RoPE (eq. 1, 3, 6)."""
        return (x if hasattr(self, "q_proj") else self.q_a_proj(x)), self.kv_a_proj_with_mqa(x)

    def _rotated(self, q_in, kv, cos, sin):
        """Latent norms, the query up-projection and RoPE: (q_nope, rotated q_pe [B, T, H, d],
        normalised c_kv [B, T, r], rotated k_pe [B, T, d_R]) (eq. 3, 7-9)."""
        q = self.q_proj(q_in) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(q_in))
        q_nope, q_pe = q.unflatten(-1, (self.num_heads, self.nope_dim + self.rope_dim)).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope, apply_rotary(q_pe, cos, sin), self.kv_a_layernorm(c_kv), k_pe

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """``x`` [B, T, D]; ``rope`` the (cos, sin) of the T positions; returns [B, T, D]."""
        q_in, kv = self._down(x)
        if cache is None:
            out = self._attend(*self._heads(q_in, kv, *rope))
        else:
            q_nope, q_pe, c_kv, k_pe = self._rotated(q_in, kv, *rope)
            c_kv, k_pe = cache.update(self.layer_idx, c_kv, k_pe)
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe)
        return self.o_proj(out.flatten(2))

    def _heads(self, q_in, kv, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training form: the per-head queries, keys and values [B, T, H, d] materialised from the
        latents (the up-projections, eq. 2-5, 7-10)."""
        q_nope, q_pe, c_kv, k_pe = self._rotated(q_in, kv, cos, sin)
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, -1)).split([self.nope_dim, self.v_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], dim=-1)
        # Fused (flash) SDPA kernels want one head size for q, k and v: pad v with zeros.
        pad = q.shape[-1] - self.v_dim
        return q, k, (F.pad(v, (0, pad)) if pad > 0 else v)

    def _attend(self, q, k, v) -> torch.Tensor:
        """Causal attention of the per-head q, k, v; [B, T, H, d_v]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )
        return out.transpose(1, 2)[..., : self.v_dim]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        """Inference form: attend in latent space; W^UK folds into q, W^UV into the output."""
        w = self.kv_b_proj.weight.unflatten(0, (self.num_heads, -1))
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = torch.einsum("bthr,bsr->bhts", q_latent, c_kv) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        t, s = scores.shape[-2], scores.shape[-1]
        start = s - t  # the new queries are the last t of the s cached positions
        future = torch.arange(s, device=scores.device)[None, :] > (start + torch.arange(t, device=scores.device))[:, None]
        probs = (scores.float() * self.scale).masked_fill(future, float("-inf")).softmax(-1).to(c_kv.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
