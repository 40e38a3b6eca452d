"""Routed experts as one grouped computation over tokens sorted by expert (report 2.1.2, eq. 12).

A dispatcher (``plugins.model.dispatch``) sorts the rows by expert; the experts run as grouped
GEMMs (``plugins.model.gemm.grouped_mm``) over the contiguous per-expert segments. With
``recompute`` (``train.memory.swiglu_recompute``) the SwiGLU output is recomputed in backward
(``plugins.model.swiglu_recompute``); ``row_weights`` (``train.memory.weighted_combine``) are
applied before the down-projection.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import Gemm, GroupedGemm, grouped_mm
from .offload import HostOffload
from .swiglu_recompute import recomputed_swiglu, weighted


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as [E, out, in] tensors (HF's fused layout, gate and up stacked)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.recompute = False  # the SwiGLU output recomputed in backward
        self.gemm: Gemm = GroupedGemm()  # how the GEMMs run (FP8 under the FP8 policy)
        self.store: Gemm = GroupedGemm()  # how the kept SwiGLU input is stored (FP8 tiles: fp8_activations)
        self.offload: HostOffload | None = None  # what the recomputing path keeps, in host memory (offload_ffn)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weights: torch.Tensor | None = None,
                quantized: tuple[torch.Tensor, torch.Tensor] | None = None, to_tokens=None) -> torch.Tensor:
        """``x`` [M, D] expert-sorted rows, ``counts`` [E], ``row_weights`` [M] (each row's routing weight,
        applied before the down-projection; None: the combine applies it) -> [M, D]. FP8-dispatched
        rows come as ``quantized`` (their E4M3 tiles), ``x`` being the tokens they came from and
        ``to_tokens`` the map of the rows' gradient to the tokens' (``plugins.model.dispatch``)."""
        if self.recompute and torch.is_grad_enabled():
            with self.offload.hooks() if self.offload is not None else contextlib.nullcontext():
                return recomputed_swiglu(x, (self.gate_up_proj,), self.down_proj, self.gemm, self.store, counts,
                                         row_weights, quantized, to_tokens)
        if quantized is not None:  # a forward without autograd: the rows' values, from their tiles
            if torch.is_grad_enabled():
                raise RuntimeError("FP8-dispatched rows train through the recomputing SwiGLU "
                                   "(train.memory.swiglu_recompute)")
            x = self.gemm.load(quantized, torch.Size((quantized[0].shape[0], x.shape[-1])), x.dtype)
        gate, up = self.linear(x, self.gate_up_proj, counts).chunk(2, dim=-1)
        h = F.silu(gate) * up
        return self.linear(h if row_weights is None else weighted(h, row_weights), self.down_proj, counts)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One grouped linear through autograd: ``x`` [M, K] times ``weight`` [E, N, K]^T."""
        return grouped_mm(x, weight.transpose(1, 2), counts)
