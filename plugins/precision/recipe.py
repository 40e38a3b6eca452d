"""The training precision recipe (report 3.3), chosen by ``train.precision``:

- ``bf16``: BF16 weights, activations and GEMMs (FP8 GEMMs under ``--fp8``); FP32 master weights
  and AdamW moments in ZeRO-1's partition (BF16 moments with ``train.optimizer_moments_dtype``);
  every micro-batch's gradient added into an FP32 buffer per parameter and the data-parallel
  reduction done in FP32 (report 3.3.2, 3.3.4: "the gradients used for batch-size accumulation"
  stay FP32); the embedding's gradient, the output heads, the router's scores, top-k and bias,
  RMSNorm and the attention softmax in float32 (``plugins.model.high_precision``).
- ``fp32``: everything in float32 (on a CPU about twice as fast as BF16, which it emulates).
- ``auto``: ``bf16`` on a GPU, ``fp32`` on a CPU.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """``bf16`` or ``fp32``: what ``precision`` runs as on this device."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision
