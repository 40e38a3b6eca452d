"""Hosting expert-parallel parameters in DeepSpeed (report 3.2.2: EP inside ZeRO-1 data parallelism).

Each rank's routed-expert banks hold different experts, so their gradients are summed only over
the ranks holding the same experts (the expert-data-parallel group) while everything else is
averaged over the whole data-parallel group, and ZeRO-1 partitions their optimizer states over
the expert-data-parallel group. DeepSpeed does this for parameters marked ``allreduce = False``
with a ``group_name`` and optimizer groups flagged ``moe``; its engine turns the machinery on for
its own MoE layer class only, so ``ExpertParallelEngine`` turns it on for marked parameters.
"""

from __future__ import annotations

import torch
from deepspeed import DeepSpeedConfig, DeepSpeedEngine, set_optimizer_flags
from deepspeed.moe.utils import is_moe_param


def mark_expert_parameters(params: list[torch.nn.Parameter], group_name: str) -> None:
    for param in params:
        param.allreduce = False
        param.group_name = group_name


class ExpertParallelEngine(DeepSpeedEngine):
    def _configure_distributed_model(self, model: torch.nn.Module) -> None:
        super()._configure_distributed_model(model)
        self.has_moe_layers = self.has_moe_layers or any(is_moe_param(p) for p in model.parameters())


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> DeepSpeedEngine:
    """``deepspeed.initialize`` for our model: the stock engine, or the expert-parallel one when
    some parameters are marked as experts."""
    if not any(is_moe_param(p) for p in model.parameters()):
        import deepspeed

        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
    config_class = DeepSpeedConfig(config)
    set_optimizer_flags(config_class, model)
    return ExpertParallelEngine(args=None, model=model, optimizer=optimizer, config=config, config_class=config_class)
