"""The assembled DeepSeek-V3 model (report 2): embedding -> L blocks -> RMSNorm -> output head,
plus D MTP modules sharing the embedding and the head.

The parts stay separable for pipeline stages: ``embed``, ``layers``, ``final``, ``mtp``.

CLI: ``python -m plugins.model count CONFIG.yaml`` prints total/activated/MTP parameter counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .block import DecoderLayer
from .config import ConfigError, ModelConfig
from .experts import RoutedExperts
from .mla import LatentCache
from .moe import DeepSeekMoE
from .mtp import IGNORE_INDEX, MTPModule, mtp_targets, shift_left
from .norm import RMSNorm
from .router import Router
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """What ``DeepSeekV3.forward`` returns. Losses are set when labels are given.

    ``loss = lm_loss + mtp_loss + aux_loss``; ``mtp_loss`` is already ``lambda/D * sum_k``;
    ``mtp_losses`` are the unweighted per-depth cross-entropies; ``expert_loads`` [M, E] holds
    the tokens per expert of each MoE block, in ``DeepSeekV3.moe_layers()`` order.
    """

    logits: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None
    expert_loads: torch.Tensor | None = None


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32 over targets != -100 (0 when there are none)."""
    flat = targets.reshape(-1)
    if not (flat != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def init_weights(root: nn.Module, std: float) -> None:
    """Every weight ~ N(0, std) (report 4.2: 0.006); norms 1; router bias 0."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RoutedExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        if isinstance(module, Router):
            module.e_score_correction_bias.zero_()


class DeepSeekV3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + d) for d in range(config.num_nextn_predict_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config.initializer_range)

    def moe_layers(self) -> list[DeepSeekMoE]:
        """Every DeepSeekMoE of the model (main blocks, then MTP blocks): one row of expert_loads each."""
        return [m for m in self.modules() if isinstance(m, DeepSeekMoE)]

    def hidden_states(self, input_ids: torch.Tensor, cache: LatentCache | None = None):
        """The main trunk: embedding and blocks. Returns the last hidden state (before the final
        norm; MTP's input), the positions' (cos, sin), and the MoE blocks' balance losses and loads."""
        start = 0 if cache is None else cache.seq_len
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        rope = self.rotary(positions)
        h = self.embed_tokens(input_ids)
        balance_losses, loads = [], []
        for layer in self.layers:
            h, balance, load = layer(h, rope, cache)
            if balance is not None:
                balance_losses.append(balance)
                loads.append(load)
        return h, rope, balance_losses, loads

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
        h, rope, balance_losses, loads = self.hidden_states(input_ids, cache)
        logits = self.lm_head(self.norm(h))
        out = ModelOutput(logits=logits)
        if cache is None:
            for k, module in enumerate(self.mtp, start=1):
                ahead = self.embed_tokens(shift_left(input_ids, k, fill=0))
                h, balance, load = module(h, ahead, rope)
                if balance is not None:
                    balance_losses.append(balance)
                    loads.append(load)
                out.mtp_logits.append(self.lm_head(module.norm(h)))
        if loads:
            out.expert_loads = torch.stack(loads)
        if labels is None:
            return out
        out.lm_loss = _cross_entropy(logits, labels)
        out.aux_loss = torch.stack(balance_losses).sum() if balance_losses else logits.new_zeros(())
        out.mtp_losses = [
            _cross_entropy(mtp_logits, mtp_targets(labels, k, document_ids))
            for k, mtp_logits in enumerate(out.mtp_logits, start=1)
        ]
        weight = self.config.mtp_loss_weight if mtp_weight is None else mtp_weight
        out.mtp_loss = (
            weight / len(out.mtp_losses) * torch.stack(out.mtp_losses).sum() if out.mtp_losses else logits.new_zeros(())
        )
        out.loss = out.lm_loss + out.mtp_loss + out.aux_loss
        return out

    @classmethod
    def from_hf(cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Load a HF DeepseekV3 checkpoint directory (config.json + safetensors), streaming tensors."""
        from .hf_interop import load_hf_checkpoint

        return load_hf_checkpoint(directory, device=device, dtype=dtype)

    def to_hf(self, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
        from .hf_interop import save_hf_checkpoint

        return save_hf_checkpoint(self, directory, max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> int:
    from .param_count import count_parameters

    parser = argparse.ArgumentParser(prog="python -m plugins.model", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    count = commands.add_parser("count", help="print {total, activated, mtp} parameters as one JSON line")
    count.add_argument("config", help="a YAML config with a 'model:' section")
    args = parser.parse_args(argv)
    try:
        config = ModelConfig.from_yaml(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(count_parameters(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
