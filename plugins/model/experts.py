"""Routed experts as one grouped computation over tokens sorted by expert (report 2.1.2, eq. 12).

A dispatcher (``plugins.model.dispatch``) sorts the rows by expert; the experts run as grouped
GEMMs (``torch.nn.functional.grouped_mm``) over the contiguous per-expert segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
