"""Initialisation that does not depend on the parallel layout (report 4.2: every weight ~ N(0, 0.006)).

Each parameter draws its values from its own generator, seeded by (seed, parameter name), and each
routed expert of a stacked bank by (seed, name, global expert index). A rank that holds only some
pipeline stages or some experts therefore initialises exactly the values the single-process model
has there, with no communication and without ever building the rest: ``materialize`` turns a
model built on the ``meta`` device into real tensors on the rank's device.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .experts import RoutedExperts
from .moe import DeepSeekMoE
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .router import Router


def _generator(seed: int, name: str, index: int | None = None) -> torch.Generator:
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))


def _normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Drawn on the CPU (the same numbers on every device), then copied; nothing to do on ``meta``."""
    if not param.is_meta:
        param.copy_(torch.empty(param.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=generator))


@torch.no_grad()
def init_weights(root: nn.Module, std: float, seed: int | None = None, prefix: str = "", expert_offset: int = 0) -> None:
    """Weights ~ N(0, std), norms 1, router biases 0. ``prefix``: ``root``'s name in the full model;
    ``expert_offset``: the global index of the first expert ``root``'s banks hold (expert
    parallelism). Without ``seed`` one is drawn from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
    for module_name, module in root.named_modules():
        name = f"{prefix}{module_name}." if module_name else prefix
        if any(p.is_meta for p in module.parameters(recurse=False)):
            continue  # nothing to draw on ``meta`` (the planner's models): skip the generators too
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            _normal_(module.weight, std, _generator(seed, name + "weight"))
        elif isinstance(module, RoutedExperts):
            for bank in ("gate_up_proj", "down_proj"):
                weights = getattr(module, bank)
                for e in range(weights.shape[0]):
                    _normal_(weights[e], std, _generator(seed, name + bank, expert_offset + e))
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        if isinstance(module, Router) and not module.e_score_correction_bias.is_meta:
            module.e_score_correction_bias.zero_()


def materialize(model: nn.Module, device: torch.device | str, std: float | None, seed: int = 0,
                expert_offset: int = 0, dtype: torch.dtype | None = None) -> None:
    """Allocate a ``meta``-built model (or the part of it a rank kept) on ``device``, in ``dtype``
    if given (the router biases stay FP32, report 3.3.1), and initialise it as the whole model
    would be (``std=None``: leave the weights for a checkpoint to fill); router biases and load
    counters start at zero, rotary frequencies are recomputed."""
    if dtype is not None:
        model.to(dtype)
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
    model.to_empty(device=device)
    if std is not None:
        init_weights(model, std, seed, expert_offset=expert_offset)
    with torch.no_grad():
        for module_name, module in list(model.named_modules()):
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
            elif isinstance(module, DeepSeekMoE):
                module.tokens_per_expert.zero_()
            elif isinstance(module, RotaryEmbedding):
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, RotaryEmbedding(module.config).to(device))
