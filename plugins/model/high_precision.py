"""What computes in float32 whatever the weights' dtype (report 3.3.1: the embedding, the output
head, the MoE gating, the normalisation and attention operators keep their original precision).
Under ``train.precision: bf16`` the weights are BF16 replicas of ZeRO's FP32 masters; these
modules read them in float32: BF16 values are exact in float32, so the products are exact and the
sums float32. The norms (``norm``) and the attention softmax (``mla``) upcast their inputs
themselves; the router's scores, top-k and bias update use ``float32_linear``; the output heads
``Float32Head``; the embedding ``Float32GradEmbedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` [m, n] in float32. The products of BF16 values are exact in float32, so the result
    is the float32 sum either way: on a GPU one GEMM with BF16 operands and a float32 output (cuBLAS,
    ``torch.mm``'s ``out_dtype``: no float32 copy of a [vocab, hidden] head); elsewhere (torch's CPU
    build has no such kernel) on float32 copies."""
    if a.dtype == b.dtype == torch.bfloat16 and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float().mm(b.float())


class _Float32Linear(torch.autograd.Function):
    """``x W^T`` in float32, keeping ``x`` for backward in its own dtype: on bf16 the autograd of
    ``F.linear(x.float(), ...)`` would keep a float32 copy of every token (4 x width bytes per
    token), where ``x`` is a norm's output that the block keeps (or recomputes) anyway. The same
    products as that autograd; the gradients are returned in the operands' dtypes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return float32_mm(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        dx = flat.mm(weight.float()).to(x.dtype).view(x.shape)
        return dx, flat.t().mm(x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T`` [..., out] in float32 (the gate's affinities, the heads' logits)."""
    return _Float32Linear.apply(x, weight)


class Float32Head(nn.Linear):
    """An output head whose logits are float32 (report 3.3.1); its weight keeps the model's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float32_linear(x, self.weight)


class _Float32GradEmbedding(torch.autograd.Function):
    """A lookup whose weight gradient sums the tokens' gradients in float32 (then one rounding to
    the weight's dtype), as CUDA's embedding backward does for bf16; the CPU kernel sums in the
    weight's dtype, which loses the rare tokens' contributions beside a frequent one's."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        summed = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=grad.device)
        summed.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).float())
        return None, summed.to(grad.dtype)


class Float32GradEmbedding(nn.Embedding):
    """``nn.Embedding`` whose weight gradient is summed in float32 on every device (native where the
    weights are float32 or the kernel already sums in float32: CUDA)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32 or self.weight.is_cuda:
            return super().forward(ids)
        return _Float32GradEmbedding.apply(ids, self.weight)
