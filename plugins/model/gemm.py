"""The GEMMs of the feed-forward layers, as strategies a recomputing SwiGLU can call piece by piece
(``plugins.model.swiglu_recompute``): Fprop ``y = x W^T``, Dgrad ``dx = dy W`` and Wgrad
``dW = dy^T x``, for one weight (dense FFNs, shared experts) or per expert over expert-sorted rows
(``grouped_mm``, report 2.1.2). ``keep`` turns a GEMM input into what backward stores of it;
``store``/``load`` do the same for the SwiGLU input. These keep the model's dtype; the FP8 recipe's
versions are ``plugins.precision.fp8.FP8Gemm`` and ``FP8GroupedGemm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned rows; it runs on CPU in float32/bf16/fp16 and on CUDA on
    Hopper-class GPUs in bf16; under ``torch.compile`` only in bf16 (its meta kernel's one dtype)."""
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (9, 0) and x.dtype == torch.bfloat16
    return False


def _padded(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted rows [M, D] as [E, capacity, D] (zero rows appended), and each row's (expert, slot).
    The capacity is the largest count (a host read), under ``torch.compile`` M (no size that depends
    on the data: the compiled graph has no break, at E times the padded buffer)."""
    num_experts = len(counts)
    capacity = x.shape[0] if torch.compiler.is_compiling() else int(counts.max()) if counts.numel() else 0
    ends = torch.cumsum(counts, 0)
    rows = torch.arange(x.shape[0], device=x.device)
    expert_of_row = torch.searchsorted(ends, rows, right=True)
    slot = rows - (ends - counts)[expert_of_row]
    padded = x.new_zeros(num_experts, capacity, x.shape[-1])
    padded[expert_of_row, slot] = x
    return padded, expert_of_row, slot


def padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The same product as ``grouped_mm`` through one batched matmul over per-expert padded rows,
    for devices without a grouped GEMM. Padding rows are zeros and are dropped again; no token is."""
    padded, expert_of_row, slot = _padded(x, counts)
    return torch.bmm(padded, w)[expert_of_row, slot]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] sorted by expert, ``counts`` [E] rows each, times ``w`` [E, K, N]."""
    if _grouped_mm_supported(x, w):
        return F.grouped_mm(x, w, offs=torch.cumsum(counts, 0).to(torch.int32))
    return padded_grouped_mm(x, w, counts)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per expert e, dy_e^T x_e over its rows: [E, N, K], the weight gradient of an expert bank
    [E, N, K] (the values ``grouped_mm``'s autograd computes, in the bank's own layout)."""
    if _grouped_mm_supported(dy, x):
        # dy^T needs 16-byte aligned rows: zero rows appended to the last expert add nothing to its sum
        pad = -dy.shape[0] % (16 // dy.element_size())
        offs = torch.cumsum(counts, 0).to(torch.int32)
        if pad:
            dy, x = F.pad(dy, (0, 0, 0, pad)), F.pad(x, (0, 0, 0, pad))
            offs = torch.cat([offs[:-1], offs[-1:] + pad])
        return F.grouped_mm(dy.T, x, offs=offs)
    return torch.bmm(_padded(dy, counts)[0].transpose(1, 2), _padded(x, counts)[0])


class Gemm:
    """One weight [N, K] in its dtype: the products ``F.linear``'s autograd computes."""

    def prepare(self, weight: torch.Tensor):
        return weight

    def keep(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,)

    def fprop(self, kept, weight, counts=None) -> torch.Tensor:
        return F.linear(kept[0], weight)

    def dgrad(self, dy: torch.Tensor, weight, counts=None) -> torch.Tensor:
        return dy.mm(weight)

    def wgrad(self, dy: torch.Tensor, kept, counts, cols: int) -> torch.Tensor:
        return dy.t().mm(kept[0])

    def store(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,)

    def load(self, stored, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return stored[0]


class GroupedGemm(Gemm):
    """Expert banks [E, N, K] over expert-sorted rows, ``counts`` rows per expert."""

    def fprop(self, kept, weight, counts=None) -> torch.Tensor:
        return grouped_mm(kept[0], weight.transpose(1, 2), counts)

    def dgrad(self, dy: torch.Tensor, weight, counts=None) -> torch.Tensor:
        return grouped_mm(dy, weight, counts)

    def wgrad(self, dy: torch.Tensor, kept, counts, cols: int) -> torch.Tensor:
        return grouped_wgrad(dy, kept[0], counts)
