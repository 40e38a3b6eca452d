"""Transformer-Engine backend for FP8 (optional: ``pip install -e ".[gpu]"``): its
``Float8BlockScaling`` recipe is the report's 1x128 / 128x128 E4M3 scaling in native Hopper GEMMs.
Imported only when chosen; everywhere else ``unavailable_reason`` says why it cannot run."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def unavailable_reason() -> str | None:
    """None where TE block scaling can run, else a short reason."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return "transformer-engine is not installed (pip install -e \".[gpu]\")"
    if not torch.cuda.is_available():
        return "transformer-engine FP8 needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (9, 0):
        return "FP8 block scaling needs a Hopper-class GPU (compute capability 9.0 or newer)"
    return None


def te_linear(linear: nn.Linear) -> nn.Module:
    """A ``te.Linear`` on the current CUDA device holding ``linear``'s weights (same parameter
    names, plus TE's ``_extra_state``); the engine moves the rest of the model there later."""
    import transformer_engine.pytorch as te

    module = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       params_dtype=linear.weight.dtype, device=torch.device("cuda", torch.cuda.current_device()))
    with torch.no_grad():
        module.weight.copy_(linear.weight)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
    return module


def autocast() -> contextlib.AbstractContextManager:
    """TE's FP8 autocast with the block-scaling recipe (``te.autocast`` where present, else the older
    ``te.fp8_autocast``)."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling

    recipe = Float8BlockScaling()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)
