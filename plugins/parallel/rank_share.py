"""What one rank holds under a layout (report 3.2: PP x EP x data parallelism), built on the
``meta`` device, so no weight is allocated: the pipeline stages of the rank's schedule
placement (DualPipe: two stages per rank) and 1/ep of every routed-expert bank."""

from __future__ import annotations

import torch

from ..model.config import ModelConfig
from ..model.deepseek_v3 import DeepSeekV3
from ..model.experts import RoutedExperts
from .dualpipe import Layout
from .expert import keep_experts
from .pipeline_stages import keep_stages
from .replicas import stages_of


def rank_model(config: ModelConfig, pp: int = 1, ep: int = 1, schedule: str = "dualpipe", pipeline_rank: int = 0,
               ep_rank: int = 0) -> DeepSeekV3:
    """The (meta) model of pipeline rank ``pipeline_rank`` and expert-parallel rank ``ep_rank``."""
    with torch.device("meta"):
        model = DeepSeekV3(config)
    if ep > 1:
        local = config.n_routed_experts // ep
        keep_experts(model, slice(ep_rank * local, (ep_rank + 1) * local))
    if pp > 1:
        layout = Layout.placement(schedule, pp)
        keep_stages(model, stages_of(layout, pipeline_rank), layout.stages)
    return model


def rank_parameters(config: ModelConfig, pp: int = 1, ep: int = 1, schedule: str = "dualpipe") -> list[dict]:
    """Per pipeline rank: the parameters one of its ranks holds (every expert-parallel rank holds as
    many), split into routed experts and the rest."""
    out = []
    for pipeline_rank in range(pp):
        model = rank_model(config, pp, ep, schedule, pipeline_rank)
        experts = sum(p.numel() for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        out.append({"pipeline_rank": pipeline_rank, "parameters": total, "routed_expert_parameters": experts,
                    "other_parameters": total - experts})
    return out
