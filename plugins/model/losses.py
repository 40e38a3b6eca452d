"""The training objective, defined once (report 2.2 eq. 25 and 2.1.2 eq. 17-20):

    L = L_Main + lambda/D * sum_k L_MTP^k + sum over MoE blocks of alpha * L_Bal

used by the whole model's forward and by every pipeline stage alike (a stage adds the terms it
holds; the sum over stages is this). ``L_Bal`` is ``model.balance``'s auxiliary loss
(``plugins.model.balance.BALANCE``; none under ``none``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .high_precision import float32_mm
from .mtp import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32 over targets != -100 (0, still differentiable, when none)."""
    flat = targets.reshape(-1)
    if not (flat != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits ``h W^T`` over targets != -100, ``chunk`` tokens at a time:
    backward recomputes each chunk's logits from ``h``, so no [tokens, vocab] tensor outlives its
    chunk (the float32 log-softmax of the whole output head would be 4 x vocab bytes per token).
    The logits are float32, as ``lm_head`` (``Float32Head``) then ``cross_entropy`` give them (report
    3.3.1); backward's GEMMs take the logits' gradient in ``h``'s dtype, sum in float32, and the
    weight gradient is summed over chunks in float32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            logits = float32_mm(h[start:start + chunk], weight.t())
            total += F.cross_entropy(logits, targets[start:start + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(h, weight, targets, count)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, targets, count = ctx.saved_tensors
        scale = grad / count
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], ctx.chunk):
            piece, target = h[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            dlogits = float32_mm(piece, weight.t()).softmax(-1)
            valid = target != IGNORE_INDEX
            dlogits[valid, target[valid]] -= 1.0
            dlogits = (dlogits * (scale * valid)[:, None]).to(h.dtype)  # the backward GEMMs' operand
            dh[start:start + ctx.chunk] = float32_mm(dlogits, weight)
            dw += float32_mm(dlogits.t(), piece)
        return dh, dw.to(weight.dtype), None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """``cross_entropy(h @ weight.T, targets)`` without keeping the logits (``_ChunkedLinearCrossEntropy``)."""
    return _ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk)


def mtp_objective(depth_losses: list[torch.Tensor], weight: float) -> torch.Tensor | None:
    """``lambda / D * sum_k L_MTP^k`` (eq. 25); None without MTP modules."""
    if not depth_losses:
        return None
    return weight / len(depth_losses) * torch.stack(depth_losses).sum()


def take_balance_losses(moe_layers) -> torch.Tensor | None:
    """Sum of the balance losses the given MoE blocks computed in their last forward (each is taken
    once, so a block's graph is not kept alive); None when none of them ran or has one
    (``model.balance: none``)."""
    losses = []
    for moe in moe_layers:
        if moe.balance_loss is not None:
            losses.append(moe.balance_loss)
            moe.balance_loss = None
    return torch.stack(losses).sum() if losses else None


@dataclass
class Losses:
    """The objective's three terms (any may be absent on a pipeline stage)."""

    lm: torch.Tensor | None = None
    mtp: torch.Tensor | None = None
    balance: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor | None:
        terms = [t for t in (self.lm, self.mtp, self.balance) if t is not None]
        return torch.stack(terms).sum() if terms else None

    def values(self, device: torch.device) -> torch.Tensor:
        """Detached float64 (lm, mtp, balance), zeros for absent terms: what is logged and summed
        over ranks (no host synchronisation)."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([zero if t is None else t.detach().double() for t in (self.lm, self.mtp, self.balance)])
