"""FP8 numerics with DeepSeek-V3's fine-grained scaling (report 3.3.2), emulated exactly.

Operands are E4M3 (``torch.float8_e4m3fn``) with one FP32 scale per 1x128 tile (activations and
activation gradients) or per 128x128 block (weights): ``scale = amax / 448``, rounded up to a power
of two by default as Transformer-Engine's block-scaling recipe does. The GEMM multiplies the FP8
values block by block along K, each 128-wide partial sum (what the Tensor Cores accumulate) is
scaled by its two scales and added into an FP32 accumulator: the report's promotion to CUDA cores
every N_C = 128 elements.

Padding: a dimension that is not a multiple of 128 is zero-padded to the next multiple before
quantization. Zeros change no amax and add nothing to any sum; outputs are cropped back.

A weight is quantized once per value (``quantized_weight``: cached on the parameter until an
optimizer step changes it), so every micro-batch of a step shares one FP8 copy; an activation read
by several linears in a row (MLA's q and kv down-projections, an FFN's gate and up projections) is
quantized once and kept once (``_quantized_input``). The inputs kept for backward are these FP8
copies (report 3.3.3).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.gemm import Gemm, grouped_mm

TILE = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.ndim - dim % x.ndim - 1) + [0, extra]
    return F.pad(x, pad)


@dataclass
class Quantized:
    """``data`` [..., R', K'] E4M3 (rows and K zero-padded), ``scale`` [..., R'/block_rows, K'/128]
    FP32: element (r, k) stands for ``data[r, k] * scale[r // block_rows, k // 128]``.
    ``block_rows`` is 1 for 1x128 tiles and 128 for 128x128 blocks."""

    data: torch.Tensor
    scale: torch.Tensor
    rows: int
    cols: int
    block_rows: int

    def row_scales(self, k_block: int) -> torch.Tensor:
        """The scale of every (padded) row for one K block: [..., R']."""
        return self.scale[..., k_block].repeat_interleave(self.block_rows, dim=-1)

    def transposed(self) -> Quantized:
        """A 128x128-block quantized matrix, transposed: the same blocks, so no re-quantization."""
        if self.block_rows != TILE:
            raise ValueError("only 128x128 blocks transpose without re-quantization (1x128 tiles become 128x1)")
        return Quantized(self.data.transpose(-1, -2), self.scale.transpose(-1, -2), self.cols, self.rows, TILE)


def quantize(x: torch.Tensor, block_rows: int, power_of_two: bool = True) -> Quantized:
    """Quantize the last two dims of ``x`` [..., R, K] in (block_rows x 128) blocks to E4M3."""
    rows, cols = x.shape[-2], x.shape[-1]
    padded = _pad_to(_pad_to(x.float(), -1, TILE), -2, block_rows)
    blocks = padded.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, block_rows))  # [..., Rb, br, Kb, 128]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., Rb, Kb]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    data = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return Quantized(data.flatten(-2).flatten(-3, -2), scale, rows, cols, block_rows)


def quantized_weight(weight: torch.Tensor, power_of_two: bool) -> Quantized:
    """``weight`` [..., N, K] in 128x128 blocks, quantized once per value: the copy is kept on the
    parameter and made again when an in-place update (the optimizer step) bumps its version."""
    key = (weight.data_ptr(), weight._version, power_of_two)
    cached = getattr(weight, "_fp8_blocks", None)
    if cached is None or cached[0] != key:
        cached = (key, quantize(weight.detach(), TILE, power_of_two))
        weight._fp8_blocks = cached
    return cached[1]


_LAST_INPUT = threading.local()  # per thread: a DualPipe backward (recomputing) runs beside a forward


def _quantized_input(x: torch.Tensor, power_of_two: bool) -> Quantized:
    """``x`` [..., K] in 1x128 tiles, reusing the last quantization on this thread when it was of this
    very tensor, unchanged since (the reference held here keeps the identity from being recycled)."""
    last = getattr(_LAST_INPUT, "entry", None)
    if last is not None and last[0] is x and last[1] == (x._version, power_of_two):
        return last[2]
    q = quantize(x.reshape(-1, x.shape[-1]), 1, power_of_two)
    _LAST_INPUT.entry = (x, (x._version, power_of_two), q)
    return q


def release_copies(model: torch.nn.Module) -> None:
    """Drop the FP8 weight copies of ``model``'s parameters and this thread's last quantized input: at
    the end of a step's forward and backward, before the optimizer step changes the weights."""
    for param in model.parameters():
        if hasattr(param, "_fp8_blocks"):
            del param._fp8_blocks
    _LAST_INPUT.entry = None


def dequantize(q: Quantized) -> torch.Tensor:
    """FP32 values [..., R, K] of a quantized tensor (padding cropped)."""
    scale = q.scale.repeat_interleave(q.block_rows, dim=-2).repeat_interleave(TILE, dim=-1)
    return (q.data.float() * scale)[..., : q.rows, : q.cols]


def _cropped(out: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The product without its padding, in storage of its own (a view would keep the padded buffer
    alive wherever the output is kept)."""
    if out.shape[-2:] == (rows, cols):
        return out
    return out[..., :rows, :cols].contiguous()


def scaled_mm(a: Quantized, b: Quantized, block_owner: torch.Tensor | None = None, groups: int = 0) -> torch.Tensor:
    """``a`` [M, K] times ``b`` [N, K] transposed, in FP32 [M, N], promoted every 128 of K.

    With ``block_owner`` [K'/128] (a group index per K block) the partial products of each K block
    are added into ``out[block_owner[kb]]`` instead, giving [groups, M, N]: the weight gradient of
    grouped experts, whose contraction runs over each expert's own (128-padded) token rows.
    """
    if a.data.shape[-1] != b.data.shape[-1]:
        raise ValueError(f"K mismatch: {a.cols} vs {b.cols}")
    shape = (a.data.shape[0], b.data.shape[0]) if block_owner is None else (groups, a.data.shape[0], b.data.shape[0])
    out = torch.zeros(shape, dtype=torch.float32, device=a.data.device)
    owners = None if block_owner is None else block_owner.tolist()
    for kb in range(a.data.shape[-1] // TILE):
        cols = slice(kb * TILE, (kb + 1) * TILE)
        partial = a.data[:, cols].float() @ b.data[:, cols].float().T
        scaled = partial * a.row_scales(kb)[:, None] * b.row_scales(kb)[None, :]
        if owners is None:
            out += scaled
        else:
            out[owners[kb]] += scaled
    return _cropped(out, a.rows, b.rows)


def grouped_scaled_mm(a: Quantized, b: Quantized, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` [M, K] (1x128 tiles) sorted by expert, ``counts[e]`` rows each, times expert
    weights ``b`` [E, N, K] (128x128 blocks) transposed: [M, N] in FP32, promoted every 128 of K."""
    if a.data.shape[-1] != b.data.shape[-1]:
        raise ValueError(f"K mismatch: {a.cols} vs {b.cols}")
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    out = torch.zeros(a.data.shape[0], b.data.shape[-2], dtype=torch.float32, device=a.data.device)
    for kb in range(a.data.shape[-1] // TILE):
        cols = slice(kb * TILE, (kb + 1) * TILE)
        partial = grouped_mm(a.data[:, cols].float(), b.data[..., cols].float().transpose(1, 2), counts)
        out += partial * a.row_scales(kb)[:, None] * b.row_scales(kb)[expert_of_row]
    return _cropped(out, a.rows, b.rows)


def _expert_padded_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each expert-sorted row goes when every expert's segment is padded to a multiple of 128
    (so no 128-row tile mixes two experts), the expert owning each tile, and the padded length."""
    padded = (counts + TILE - 1) // TILE * TILE
    starts, padded_starts = torch.cumsum(counts, 0) - counts, torch.cumsum(padded, 0) - padded
    experts = torch.arange(len(counts), device=counts.device)
    expert_of_row = torch.repeat_interleave(experts, counts)
    rows = torch.arange(int(counts.sum()), device=counts.device)
    destination = rows - starts[expert_of_row] + padded_starts[expert_of_row]
    tile_owner = torch.repeat_interleave(experts, padded // TILE)
    return destination, tile_owner, int(padded.sum())


class FP8Gemm(Gemm):
    """One weight's GEMMs in block-scaled FP8: Fprop 1x128 tiles x 128x128 blocks, Dgrad the same with
    the weight's blocks transposed, Wgrad with 128x1 tiles; inputs kept for backward in FP8."""

    def __init__(self, power_of_two: bool = True):
        self.power_of_two = power_of_two

    def prepare(self, weight: torch.Tensor) -> Quantized:
        return quantized_weight(weight, self.power_of_two)

    def keep(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = _quantized_input(x, self.power_of_two)
        return q.data, q.scale

    def fprop(self, kept, weight: Quantized, counts=None) -> torch.Tensor:
        data, scale = kept
        return scaled_mm(Quantized(data, scale, data.shape[0], weight.cols, 1), weight)

    def dgrad(self, dy: torch.Tensor, weight: Quantized, counts=None) -> torch.Tensor:
        return scaled_mm(quantize(dy, 1, self.power_of_two), weight.transposed())

    def wgrad(self, dy: torch.Tensor, kept, counts, cols: int) -> torch.Tensor:
        data, scale = kept
        x = dequantize(Quantized(data, scale, data.shape[0], cols, 1))
        return scaled_mm(quantize(dy.T, 1, self.power_of_two), quantize(x.T, 1, self.power_of_two))

    def store(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = quantize(x, 1, self.power_of_two)
        return q.data, q.scale

    def load(self, stored, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        data, scale = stored
        return dequantize(Quantized(data, scale, shape[0], shape[1], 1)).to(dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad all through the block-scaled FP8 GEMM (``FP8Gemm``); the
    input is kept for the backward in FP8 (1x128 tiles) and re-quantized as 128x1 tiles for Wgrad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, power_of_two: bool) -> torch.Tensor:
        gemm = FP8Gemm(power_of_two)
        kept, wq = gemm.keep(x), gemm.prepare(weight)
        ctx.save_for_backward(*kept, wq.data, wq.scale)
        ctx.meta = (gemm, x.shape, weight.shape, x.dtype, weight.dtype)
        return gemm.fprop(kept, wq).to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        gemm, x_shape, w_shape, x_dtype, w_dtype = ctx.meta
        wq = Quantized(w_data, w_scale, w_shape[0], w_shape[1], TILE)
        dy = grad.reshape(x_data.shape[0], w_shape[0])
        dx = gemm.dgrad(dy, wq).to(x_dtype).view(x_shape)
        return dx, gemm.wgrad(dy, (x_data, x_scale), None, w_shape[1]).to(w_dtype), None


class FP8GroupedGemm(FP8Gemm):
    """Grouped expert GEMMs in block-scaled FP8 (Fprop 1x128 x 128x128, Dgrad, and Wgrad with 128x1
    tiles over each expert's own rows, segments padded to 128), inputs kept for backward in FP8."""

    def keep(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.store(x)  # expert rows are read by one GEMM only: no shared-input cache

    def fprop(self, kept, weight: Quantized, counts: torch.Tensor) -> torch.Tensor:
        data, scale = kept
        return grouped_scaled_mm(Quantized(data, scale, data.shape[0], weight.cols, 1), weight, counts)

    def dgrad(self, dy: torch.Tensor, weight: Quantized, counts: torch.Tensor) -> torch.Tensor:
        return grouped_scaled_mm(quantize(dy, 1, self.power_of_two), weight.transposed(), counts)

    def wgrad(self, dy: torch.Tensor, kept, counts: torch.Tensor, cols: int) -> torch.Tensor:
        data, scale = kept
        tokens, n = dy.shape
        destination, tile_owner, length = _expert_padded_rows(counts)
        x = dequantize(Quantized(data, scale, tokens, cols, 1))
        x_padded = x.new_zeros(length, cols).index_copy(0, destination, x)
        dy_padded = dy.new_zeros(length, n, dtype=torch.float32).index_copy(0, destination, dy.float())
        p2 = self.power_of_two
        return scaled_mm(quantize(dy_padded.T, 1, p2), quantize(x_padded.T, 1, p2), tile_owner, len(counts))


class _FP8GroupedLinear(torch.autograd.Function):
    """Per-expert ``y_e = x_e W_e^T`` over expert-sorted rows, all three GEMMs in block-scaled FP8
    (``FP8GroupedGemm``); the input kept for backward in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, power_of_two: bool):
        gemm = FP8GroupedGemm(power_of_two)
        kept = gemm.keep(x)
        ctx.save_for_backward(*kept, counts)
        ctx.meta = (gemm, gemm.prepare(weight), x.shape[-1], x.dtype, weight.dtype)
        return gemm.fprop(kept, ctx.meta[1], counts).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        data, scale, counts = ctx.saved_tensors
        gemm, wq, cols, x_dtype, w_dtype = ctx.meta
        dx = gemm.dgrad(grad, wq, counts).to(x_dtype)
        return dx, gemm.wgrad(grad, (data, scale), counts, cols).to(w_dtype), None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, power_of_two: bool = True) -> torch.Tensor:
    """``x @ weight.T`` with DeepSeek-V3's FP8 recipe (no bias: none of the model's linears has one)."""
    return _FP8Linear.apply(x, weight, power_of_two)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, power_of_two: bool = True):
    """Expert-sorted rows ``x`` [M, K] (``counts`` [E] per expert) times ``weight`` [E, N, K] transposed."""
    return _FP8GroupedLinear.apply(x, weight, counts, power_of_two)
