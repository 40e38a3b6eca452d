"""Activation recomputation (report 3.2.3, "Recomputation of RMSNorm and MLA Up-Projection"):
``set_recompute(model, mode)`` after construction, ``mode`` one of

- ``none``: every activation backward needs is stored;
- ``selective`` (the report's): the outputs of every block's RMSNorms and MLA up-projections are
  not kept. Each such sub-computation is a non-reentrant checkpoint (its intermediates are
  recomputed); its output is consumed as usual, then its storage is freed, and when the gradient
  of the consumer's output arrives the sub-computation runs again from its kept inputs and
  refills that storage, so the consumers' saved references see it again (Megatron-LM's
  ``CheckpointWithoutOutput``). Recomputed: the block's two norms, the latent norms, the q and kv
  up-projections and RoPE, the per-head q, k, v that attention consumes (each twice in backward:
  the refill and the checkpoint's own recomputation); attention itself, the down-projections,
  experts and FFNs are not. Exact: the graph is ``none``'s and the recomputed values are the
  same, so the gradients equal ``none``'s bit for bit;
- ``full``: every decoder block (the MTP modules' blocks included) is a non-reentrant
  ``torch.utils.checkpoint``: only its input is kept and its whole forward runs again in backward.

While a block's forward runs again, ``recompute_state.recomputing()`` is true on that thread: the MoE layer then
neither counts its expert loads again nor replaces its balance loss (``plugins.model.moe``).
Inference (a latent cache) and ``torch.no_grad`` forwards run the plain modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .block import DecoderLayer
from .mla import MultiHeadLatentAttention
from .recompute_state import Recomputation

MODES = ("none", "selective", "full")


def _contexts():
    """``checkpoint``'s context_fn: nothing for the original forward, the flag for the recomputation."""
    return contextlib.nullcontext(), Recomputation()


def _training(cache) -> bool:
    return cache is None and torch.is_grad_enabled()


class Forgotten:
    """One sub-computation ``fn(*inputs) -> tuple of tensors`` whose outputs are not kept for
    backward: call it, let the consumers run on its outputs, then ``forget(anchor)`` with a tensor
    computed from them. ``fn`` runs as a non-reentrant checkpoint (its own intermediates are
    recomputed when its backward needs them); its outputs' storage is freed, and refilled by
    running ``fn`` again when ``anchor``'s gradient arrives, before any consumer's backward can read
    it. The graph is the one ``none`` records, so the gradients are the same bit for bit."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]]):
        self.fn, self.inputs, self.storages = fn, (), {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inputs = inputs
        outputs = checkpoint(self.fn, *inputs, use_reentrant=False)
        # storages, not the outputs: an output holds its grad_fn, which will hold this object's hook
        self.storages = {out.untyped_storage()._cdata: (i, out.untyped_storage()) for i, out in enumerate(outputs)}
        return outputs

    def forget(self, anchor: torch.Tensor) -> None:
        if not anchor.requires_grad:
            return
        for _, storage in self.storages.values():
            storage.resize_(0)
        anchor.register_hook(self._gradient_arrived)

    def _gradient_arrived(self, _grad) -> None:
        if not self.storages:  # refilled already (a later pass: a deferred weight gradient)
            return
        with torch.no_grad():
            outputs = self.fn(*self.inputs)
        for index, storage in self.storages.values():
            fresh = outputs[index].untyped_storage()
            storage.resize_(fresh.nbytes())
            storage.copy_(fresh)
        self.storages, self.inputs = {}, ()


def _norm_then(norm: nn.Module, sublayer: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``sublayer(norm(h))`` with the norm's output recomputed for backward."""
    unit = Forgotten(lambda x: (norm(x),))
    (normed,) = unit(h)
    out = sublayer(normed)
    unit.forget(out)
    return out


class SelectiveDecoderLayer(DecoderLayer):
    """``selective``: both RMSNorm outputs recomputed (the latent norms and up-projections by
    ``SelectiveAttention``)."""

    def forward(self, h, rope, cache=None):
        if not _training(cache):
            return super().forward(h, rope, cache)
        h = h + _norm_then(self.input_layernorm, lambda x: self.self_attn(x, rope), h)
        return h + _norm_then(self.post_attention_layernorm, self.mlp, h)


class SelectiveAttention(MultiHeadLatentAttention):
    """``selective``: the latent norms, up-projections and RoPE recomputed; attention keeps only the
    latents [B, T, r] where it kept the per-head q, k, v [B, T, H, d]."""

    def forward(self, x, rope, cache=None):
        if not _training(cache):
            return super().forward(x, rope, cache)
        q_in, kv = self._down(x)
        unit = Forgotten(self._heads)
        out = self._attend(*unit(q_in, kv, *rope))
        unit.forget(out)
        return self.o_proj(out.flatten(2))


class CheckpointedDecoderLayer(DecoderLayer):
    """``full``: the whole block recomputed from its input."""

    def forward(self, h, rope, cache=None):
        if not _training(cache):
            return super().forward(h, rope, cache)
        return checkpoint(super().forward, h, rope, use_reentrant=False, context_fn=_contexts)


_CLASSES = {
    "none": {DecoderLayer: DecoderLayer, MultiHeadLatentAttention: MultiHeadLatentAttention},
    "selective": {DecoderLayer: SelectiveDecoderLayer, MultiHeadLatentAttention: SelectiveAttention},
    "full": {DecoderLayer: CheckpointedDecoderLayer, MultiHeadLatentAttention: MultiHeadLatentAttention},
}


def set_recompute(model: nn.Module, mode: str) -> None:
    """Put every decoder block and attention of ``model`` in ``mode`` (any mode from any other).
    Only the forward changes: the modules keep their parameters, names and math."""
    if mode not in MODES:
        raise ValueError(f"recompute mode {mode!r}: expected one of {', '.join(MODES)}")
    for module in model.modules():
        base = next((b for b in (DecoderLayer, MultiHeadLatentAttention) if isinstance(module, b)), None)
        if base is not None:
            module.__class__ = _CLASSES[mode][base]
