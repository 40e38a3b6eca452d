"""Cutting DeepSeek-V3 into pipeline stages (report 3.2.1): the embedding on stage 0; the final
norm, output head and MTP modules on the last stage; the blocks split as evenly as possible.

``keep_stages`` prunes a ``DeepSeekV3`` to the pieces one rank's stages need, so the rank's module
keeps the full model's parameter names and its forward parts (``trunk``, ``outputs``) and
objective (``plugins.model.losses``) are the whole model's. When a rank holds both the first and
the last stage (DualPipe's ranks 0 and PP-1, DualPipeV's rank 0) MTP's embedding and head are
physically the main model's; otherwise the last stage keeps its own embedding replica whose
gradients are summed with stage 0's (``plugins.parallel.replicas``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.deepseek_v3 import DeepSeekV3
from ..model.losses import Losses, take_balance_losses


def layer_spans(num_layers: int, stages: int) -> list[range]:
    """Blocks of each stage: contiguous, sizes differing by at most one (earlier stages larger)."""
    if num_layers < stages:
        raise ConfigError(f"model.num_hidden_layers = {num_layers}: fewer blocks than the {stages} pipeline stages "
                          f"(set --set model.num_hidden_layers={stages} or more, or a smaller --pp)")
    base, extra = divmod(num_layers, stages)
    starts = [s * base + min(s, extra) for s in range(stages + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(stages)]


def stage_pieces(config, stage: int, stages: int) -> list[str]:
    """Names of the top-level pieces a stage needs: ``embed``, ``layer.I``, ``head`` (norm, output
    head and MTP modules)."""
    pieces = [f"layer.{i}" for i in layer_spans(config.num_hidden_layers, stages)[stage]]
    needs_embedding = stage == 0 or (stage == stages - 1 and (config.num_nextn_predict_layers or config.tie_word_embeddings))
    return (["embed"] if needs_embedding else []) + pieces + (["head"] if stage == stages - 1 else [])


def piece_of(name: str) -> str:
    """The piece (``embed``, ``layer.I``, ``head``) a full-model parameter name belongs to."""
    top = name.split(".")[0]
    if top == "embed_tokens":
        return "embed"
    if top == "layers":
        return f"layer.{name.split('.')[1]}"
    return "head"


def keep_stages(model: DeepSeekV3, stages: list[int], num_stages: int) -> DeepSeekV3:
    """Drop (in place) every piece of ``model`` that none of ``stages`` needs; returns it."""
    pieces = {p for s in stages for p in stage_pieces(model.config, s, num_stages)}
    for key in list(model.layers.keys()):
        if f"layer.{key}" not in pieces:
            del model.layers[key]
    if "embed" not in pieces:
        model.embed_tokens = None
    if "head" not in pieces:
        model.norm = model.lm_head = None
        model.mtp = nn.ModuleList()
    return model


@dataclass
class StageResult:
    """One stage's forward of one micro-batch. ``objective``: what this stage backpropagates
    besides its output (its scaled loss terms); ``values``: unscaled (lm, mtp, balance) for logging."""

    output: torch.Tensor | None
    objective: torch.Tensor | None
    values: torch.Tensor


class PipelineShard:
    """The stages one pipeline rank runs, over its pruned model."""

    def __init__(self, model: DeepSeekV3, stages: list[int], num_stages: int):
        self.model = keep_stages(model, stages, num_stages)
        self.config = model.config
        self.num_stages = num_stages
        self.spans = {s: layer_spans(self.config.num_hidden_layers, num_stages)[s] for s in stages}
        self._moe_of_stage = {s: self._stage_moe(s) for s in stages}

    def _stage_moe(self, stage: int):
        blocks = [self.model.layers[str(i)].mlp for i in self.spans[stage]]
        heads = [m.block.mlp for m in self.model.mtp] if stage == self.num_stages - 1 else []
        return [m for m in blocks + heads if hasattr(m, "moe_index")]

    def run_stage(self, stage: int, x: torch.Tensor, batch: dict[str, torch.Tensor], scale: float,
                  mtp_weight: float) -> StageResult:
        """Stage ``stage`` on one micro-batch: ``x`` is the token ids on stage 0, else the hidden
        state received from the previous stage. Loss terms are scaled by ``scale`` (1 / micro-batches)."""
        model, input_ids = self.model, batch["input_ids"]
        rope = model.rope(input_ids.shape[1], input_ids.device)
        h = model.embed_tokens(x) if stage == 0 else x
        h = model.trunk(h, rope, [str(i) for i in self.spans[stage]])
        losses, output = Losses(), h
        if stage == self.num_stages - 1:
            out = model.outputs(h, input_ids, rope, batch["labels"], batch["document_ids"], mtp_weight)
            losses.lm, losses.mtp, output = out.lm_loss, out.mtp_loss, None
        losses.balance = take_balance_losses(self._moe_of_stage[stage])
        total = losses.total
        objective = total * scale if total is not None else None
        return StageResult(output, objective, losses.values(input_ids.device))
