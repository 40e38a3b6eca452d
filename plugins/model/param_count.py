"""Parameter counts from a config alone (report 1/4.2: 671B total, 37B activated, MTP on top).

The model is built on the ``meta`` device, so no weight is allocated even for the 671B shape.
Activated = every parameter a token passes through: all but the routed experts, plus k of the
E routed experts in each MoE block. The MTP module is counted separately, as the report does.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .deepseek_v3 import DeepSeekV3
from .moe import DeepSeekMoE


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = DeepSeekV3(config)
    mtp = _numel(model.mtp)
    total = _numel(model) - mtp
    k, e = config.num_experts_per_tok, config.n_routed_experts
    inactive = sum(
        _numel(moe.experts) * (e - k) // e for layer in model.layers.values() for moe in [layer.mlp] if isinstance(moe, DeepSeekMoE)
    )
    mtp_inactive = sum(_numel(moe.experts) * (e - k) // e for moe in model.mtp.modules() if isinstance(moe, DeepSeekMoE))
    return {"total": total, "activated": total - inactive, "mtp": mtp, "mtp_activated": mtp - mtp_inactive}
