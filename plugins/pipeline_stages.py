"""Cutting DeepSeek-V3 into pipeline stages (report 3.2.1): the embedding on stage 0; the final
norm, output head and MTP modules on the last stage; the blocks split as evenly as possible.
A ``PipelineShard`` holds the stages of one rank under the full model's parameter names, so
checkpoints and conversion see the same names as without pipelining. When a rank holds both
the first and the last stage (DualPipe's ranks 0 and PP-1, DualPipeV's rank 0) MTP's embedding
and head are physically the main model's; otherwise the last stage keeps its own embedding
replica whose gradients are summed with stage 0's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError
from .model import DeepSeekV3, _cross_entropy
from .moe import DeepSeekMoE
from .mtp import mtp_targets, shift_left


def layer_spans(num_layers: int, stages: int) -> list[range]:
    """Blocks of each stage: contiguous, sizes differing by at most one (earlier stages larger)."""
    if num_layers < stages:
        raise ConfigError(f"model.num_hidden_layers = {num_layers}: fewer blocks than the {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    starts = [s * base + min(s, extra) for s in range(stages + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(stages)]


def stage_pieces(config, stage: int, stages: int) -> list[str]:
    """Names of the top-level pieces a stage needs: ``embed``, ``layer.I``, ``head`` (norm, output
    head and MTP modules)."""
    pieces = [f"layer.{i}" for i in layer_spans(config.num_hidden_layers, stages)[stage]]
    needs_embedding = stage == 0 or (stage == stages - 1 and (config.num_nextn_predict_layers or config.tie_word_embeddings))
    return (["embed"] if needs_embedding else []) + pieces + (["head"] if stage == stages - 1 else [])


@dataclass
class StageResult:
    """One stage's forward of one micro-batch. ``objective``: what this stage backpropagates
    besides its output (scaled losses); ``values``: unscaled (lm, mtp, balance) sums for logging;
    ``loads``: (MoE index, tokens per expert) of its MoE blocks."""

    output: torch.Tensor | None
    objective: torch.Tensor | None
    values: torch.Tensor
    loads: list[tuple[int, torch.Tensor]]


class PipelineShard(nn.Module):
    def __init__(self, model: DeepSeekV3, stages: list[int], num_stages: int):
        super().__init__()
        config = model.config
        self.config = config
        self.num_stages = num_stages
        self.spans = {s: layer_spans(config.num_hidden_layers, num_stages)[s] for s in stages}
        pieces = {p for s in stages for p in stage_pieces(config, s, num_stages)}
        self.rotary = model.rotary
        if "embed" in pieces:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(config.num_hidden_layers)
                                     if f"layer.{i}" in pieces})
        if "head" in pieces:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        moe = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
        held = {id(m) for m in self.modules() if isinstance(m, DeepSeekMoE)}
        self.moe_index = {id(m): i for i, m in enumerate(moe) if id(m) in held}  # position in the whole model
        self.num_moe = len(moe)

    def moe_layers(self) -> list[tuple[int, DeepSeekMoE]]:
        """(index in ``DeepSeekV3.moe_layers()`` order, layer) of the MoE blocks held here."""
        return sorted((self.moe_index[id(m)], m) for m in self.modules() if isinstance(m, DeepSeekMoE))

    def run_stage(self, stage: int, x: torch.Tensor, batch: dict[str, torch.Tensor], scale: float,
                  mtp_weight: float) -> StageResult:
        """Stage ``stage`` on one micro-batch: ``x`` is the token ids on stage 0, else the hidden
        state received from the previous stage. Losses are scaled by ``scale`` (1 / micro-batches)."""
        input_ids = batch["input_ids"]
        rope = self.rotary(torch.arange(input_ids.shape[1], device=input_ids.device))
        h = self.embed_tokens(x) if stage == 0 else x
        balance, loads = [], []
        for i in self.spans[stage]:
            layer = self.layers[str(i)]
            h, aux, load = layer(h, rope)
            if aux is not None:
                balance.append(aux)
                loads.append((self.moe_index[id(layer.mlp)], load))
        lm = mtp = h.new_zeros((), dtype=torch.float32)
        output = h
        if stage == self.num_stages - 1:
            output = None
            labels = batch["labels"]
            lm = _cross_entropy(self.lm_head(self.norm(h)), labels)
            depth_losses = []
            for k, module in enumerate(self.mtp, start=1):
                h, aux, load = module(h, self.embed_tokens(shift_left(input_ids, k, fill=0)), rope)
                if aux is not None:
                    balance.append(aux)
                    loads.append((self.moe_index[id(module.block.mlp)], load))
                depth_losses.append(_cross_entropy(self.lm_head(module.norm(h)), mtp_targets(labels, k, batch["document_ids"])))
            if depth_losses:
                mtp = mtp_weight / len(depth_losses) * torch.stack(depth_losses).sum()
        aux = torch.stack(balance).sum() if balance else lm.new_zeros(())
        objective = (lm + mtp + aux) * scale if (output is None or balance) else None
        values = torch.stack([lm, mtp, aux]).detach().double()
        return StageResult(output, objective, values, loads)
