"""Routed experts as one grouped computation over tokens sorted by expert (report 2.1.2, eq. 12).

Dispatch sorts the (token, slot) pairs by expert, the experts run as grouped GEMMs
(``torch.nn.functional.grouped_mm``) over the contiguous per-expert segments, and combine
scatters the gate-weighted outputs back to their tokens. Every token keeps all of its k experts:
there is no capacity and no dropping. ``plan_dispatch``/``dispatch``/``combine`` are separate
callables so expert parallelism can put an all-to-all between them and DualPipe can overlap it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DispatchPlan:
    """Rows of the sorted buffer: ``token_index[j]`` is the token of row j, ``slot_order[j]`` its
    flattened (token, slot) position; ``counts[e]`` rows belong to expert e, in expert order."""

    token_index: torch.Tensor
    slot_order: torch.Tensor
    counts: torch.Tensor


def plan_dispatch(indices: torch.Tensor, num_experts: int) -> DispatchPlan:
    flat = indices.flatten()
    slot_order = flat.argsort(stable=True)
    return DispatchPlan(
        token_index=slot_order // indices.shape[1],
        slot_order=slot_order,
        counts=torch.bincount(flat, minlength=num_experts),
    )


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Token rows [N, D] -> expert-sorted rows [N*k, D]."""
    return x[plan.token_index]


def combine(y: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Expert-sorted outputs [N*k, D] -> per-token gate-weighted sums [N, D] (in ``y``'s dtype)."""
    gate = weights.flatten()[plan.slot_order].unsqueeze(-1)
    out = torch.zeros(num_tokens, y.shape[-1], dtype=y.dtype, device=y.device)
    return out.index_add(0, plan.token_index, (y.float() * gate).to(y.dtype))


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned rows; it runs on CPU in any float dtype and on CUDA on
    Hopper-class GPUs in bf16."""
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (9, 0) and x.dtype == torch.bfloat16
    return False


def padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The same product as ``grouped_mm`` through one batched matmul over per-expert padded rows,
    for devices without a grouped GEMM. Padding rows are zeros and are dropped again; no token is."""
    num_experts, capacity = w.shape[0], int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    padded = x.new_zeros(num_experts, capacity, x.shape[-1])
    padded[expert_of_row, slot] = x
    return torch.bmm(padded, w)[expert_of_row, slot]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] sorted by expert, ``counts`` [E] rows each, times ``w`` [E, K, N]."""
    if _grouped_mm_supported(x, w):
        return F.grouped_mm(x, w, offs=torch.cumsum(counts, 0).to(torch.int32))
    return padded_grouped_mm(x, w, counts)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as [E, out, in] tensors (HF's fused layout, gate and up stacked)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` [M, D] expert-sorted rows, ``counts`` [E] -> [M, D]."""
        gate, up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), counts).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), counts)
