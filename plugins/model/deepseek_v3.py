"""The assembled DeepSeek-V3 model (report 2): embedding -> L blocks -> RMSNorm -> output head,
plus D MTP modules sharing the embedding and the head.

The forward is built from parts a pipeline stage reuses as they are (``trunk`` over some
blocks, ``outputs`` on the last stage) and the objective comes from ``plugins.model.losses``,
so the whole model and its stages compute the same loss. Blocks live in a ``ModuleDict`` keyed
by layer index: a stage that drops the blocks it does not hold keeps the full model's parameter
names (``layers.7.mlp...``), as checkpoints and HF conversion expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .block import DecoderLayer
from .config import ModelConfig
from .high_precision import Float32GradEmbedding, Float32Head
from .init import init_weights
from .losses import Losses, chunked_cross_entropy, cross_entropy, mtp_objective, take_balance_losses
from .mla import LatentCache
from .moe import DeepSeekMoE
from .mtp import MTPModule, mtp_targets, shift_left
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """What ``DeepSeekV3.forward`` returns. Losses are set when labels are given.

    ``loss = lm_loss + mtp_loss + aux_loss``; ``mtp_loss`` is already ``lambda/D * sum_k``;
    ``mtp_losses`` are the unweighted per-depth cross-entropies.
    """

    logits: torch.Tensor | None  # None when the loss was computed in chunks (``loss_chunk``)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None


class DeepSeekV3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Float32GradEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Float32Head(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + d) for d in range(config.num_nextn_predict_layers)
        )
        self.loss_chunk = 0  # tokens per chunk of a training cross-entropy (0: whole; train.memory.loss_chunk_tokens)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Layout-independent values (``plugins.model.init``); without ``seed`` drawn from torch's generator."""
        init_weights(self, self.config.initializer_range, seed)

    def moe_layers(self) -> list[DeepSeekMoE]:
        """The DeepSeekMoE blocks this module holds (main blocks, then MTP), in ``moe_index`` order."""
        return sorted((m for m in self.modules() if isinstance(m, DeepSeekMoE)), key=lambda m: m.moe_index)

    def rope(self, seq_len: int, device: torch.device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions ``start .. start + seq_len - 1``."""
        return self.rotary(torch.arange(start, start + seq_len, device=device))

    def trunk(self, h: torch.Tensor, rope, blocks: Iterable[str] | None = None,
              cache: LatentCache | None = None) -> torch.Tensor:
        """Run ``blocks`` (keys of ``layers``; default all held) on the hidden state ``h`` [B, T, D]."""
        for key in self.layers.keys() if blocks is None else blocks:
            h = self.layers[key](h, rope, cache)
        return h

    def outputs(self, h: torch.Tensor, input_ids: torch.Tensor, rope, labels: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, mtp_weight: float | None = None,
                with_mtp: bool = True) -> ModelOutput:
        """The last stage: final norm and head on the trunk's output ``h`` (before the final norm),
        the MTP modules from it, and the cross-entropy terms when ``labels`` are given. With
        ``loss_chunk`` set (``train.memory.loss_chunk_tokens``) a training forward computes each
        cross-entropy ``loss_chunk`` tokens at a time and returns no logits."""
        chunked = labels is not None and self.loss_chunk > 0 and torch.is_grad_enabled()
        normed = self.norm(h)
        out = ModelOutput(logits=None if chunked else self.lm_head(normed))
        mtp_normed = []
        if with_mtp:
            for k, module in enumerate(self.mtp, start=1):
                h = module(h, self.embed_tokens(shift_left(input_ids, k, fill=0)), rope)
                mtp_normed.append(module.norm(h))
                if not chunked:
                    out.mtp_logits.append(self.lm_head(mtp_normed[-1]))
        if labels is not None:
            def loss(normed_h: torch.Tensor, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
                if chunked:
                    return chunked_cross_entropy(normed_h, self.lm_head.weight, targets, self.loss_chunk)
                return cross_entropy(logits, targets)

            out.lm_loss = loss(normed, out.logits, labels)
            out.mtp_losses = [loss(mtp_normed[k - 1], out.mtp_logits[k - 1] if not chunked else None,
                                   mtp_targets(labels, k, document_ids)) for k in range(1, len(mtp_normed) + 1)]
            weight = self.config.mtp_loss_weight if mtp_weight is None else mtp_weight
            out.mtp_loss = mtp_objective(out.mtp_losses, weight)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        mtp_weight: float | None = None,
        cache: LatentCache | None = None,
    ) -> ModelOutput:
        """``input_ids`` [B, T]; ``labels`` [B, T] next-token targets (-100 = none);
        ``document_ids`` [B, T] packed-document index of each token (MTP never predicts across
        them); ``mtp_weight`` overrides the config's lambda (its schedule); with ``cache`` the
        model decodes incrementally through the latent cache and skips MTP."""
        rope = self.rope(input_ids.shape[1], input_ids.device, 0 if cache is None else cache.seq_len)
        h = self.trunk(self.embed_tokens(input_ids), rope, cache=cache)
        out = self.outputs(h, input_ids, rope, labels, document_ids, mtp_weight, with_mtp=cache is None)
        ran = [layer.mlp for layer in self.layers.values()] + ([m.block.mlp for m in self.mtp] if cache is None else [])
        balance = take_balance_losses(m for m in ran if isinstance(m, DeepSeekMoE))  # taken even when unused
        if labels is not None:
            zero = h.new_zeros((), dtype=torch.float32)
            losses = Losses(out.lm_loss, out.mtp_loss, balance)
            out.mtp_loss = zero if out.mtp_loss is None else out.mtp_loss
            out.aux_loss = zero if losses.balance is None else losses.balance
            out.loss = losses.total
        return out
