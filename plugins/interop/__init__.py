"""HF DeepseekV3 checkpoints in and out (DeepSeek's published key layout, transformers' config)."""

from .hf import load_hf_checkpoint, save_hf_checkpoint

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint"]
