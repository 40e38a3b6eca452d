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

import os

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


def bound_cpu_gemm_cache() -> None:
    """oneDNN, which runs BF16 GEMMs on a CPU, caches a primitive per GEMM shape (1024 by default) and
    the routed experts' GEMMs change shape every step, so a BF16 run on a CPU grew by ~50 MB a step
    (the tiny recipe: 0.8 GB at step 1, 1.35 GB at step 8). 64 entries keep the fixed shapes cached
    and bound the rest. Call before the first GEMM; a value the user set stays."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
