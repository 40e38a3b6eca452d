"""The model's math, one concept a file (report 2): config, norm, RoPE/YaRN, MLA, router, token
dispatch, routed experts, DeepSeekMoE, balance, MTP, the block, the objective, the assembled
model and its parameter counts. Nothing here imports the distributed package: moving tensors
between ranks is ``plugins.parallel``'s job."""

from .config import ModelConfig
from .deepseek_v3 import DeepSeekV3, ModelOutput
from .init import init_weights, materialize

__all__ = ["DeepSeekV3", "ModelConfig", "ModelOutput", "init_weights", "materialize"]
