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

from plugins.expert_parallel import ExpertExchange
from plugins.experts import RoutedExperts
from plugins.moe import shard_experts

from launch.groups import ParallelGroups


def shard_for_expert_parallel(model: torch.nn.Module, groups: ParallelGroups) -> ExpertExchange | None:
    """With ``--ep N > 1``: keep this rank's experts, route tokens through an exchange over its
    expert-parallel group, and mark the expert banks for DeepSpeed. Returns the exchange."""
    if groups.ep == 1:
        return None
    moe_experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    exchange = ExpertExchange(groups.ep_group, moe_experts[0].num_experts, groups.ep_backward_group)
    shard_experts(model, exchange)
    for param in (p for m in moe_experts for p in m.parameters()):
        param.allreduce = False
        param.group_name = groups.expert_group_name
    return exchange


class ExpertParallelEngine(DeepSpeedEngine):
    def _configure_distributed_model(self, model: torch.nn.Module) -> None:
        super()._configure_distributed_model(model)
        self.has_moe_layers = self.has_moe_layers or any(is_moe_param(p) for p in model.parameters())


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, mpu=None) -> DeepSpeedEngine:
    """``deepspeed.initialize`` for our model: the stock engine, or the expert-parallel one when
    some parameters are marked as experts; ``mpu``: the pipeline grid under pipelining."""
    if not any(is_moe_param(p) for p in model.parameters()):
        import deepspeed

        return deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)[0]
    config_class = DeepSpeedConfig(config, mpu)
    set_optimizer_flags(config_class, model)
    return ExpertParallelEngine(args=None, model=model, optimizer=optimizer, config=config, config_class=config_class,
                                mpu=mpu)
