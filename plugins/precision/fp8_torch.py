"""``--fp8 torch``: the report's block-scaled FP8 GEMMs on PyTorch's native kernel (SM90, cuBLASLt >= 12.9).

The same policy, quantization and math as the emulation (``plugins.precision.fp8``): Fprop is 1x128
activation tiles x 128x128 weight blocks, Dgrad 1x128 gradient tiles x the same weight blocks
transposed (no re-quantization, report 3.3.1), Wgrad 128x1 tiles of the gradient and of the input
(1x128 tiles of both transposed, so ``1x128 x 1x128``), each through ``torch.nn.functional.scaled_mm``
(ATen's ``_scaled_mm_v2``) with explicit recipes; the routed experts run one scaled GEMM per expert
over their expert-sorted segments (PyTorch's grouped scaled GEMM takes row-wise and MX scales, not
this recipe). The FP8 bytes and scales are the emulation's own (``quantize``, ``quantized_weight``,
the shared-input cache), so only the GEMM differs.

The scaled GEMM is one seam, ``KERNEL``: ``F.scaled_mm`` on a GPU, and in the tests the CPU
reference of its contract (``plugins.precision.scaled_mm_reference``), so the layouts this module
builds (``a_operand``, ``b_operand_blocks``, ``b_operand_tiles``, the padding) are checked against ATen's contract, and the
whole backend against the emulation, without a GPU.

Layout choices beyond ATen's checks: the row count of a 1x128 ``mat_a`` is padded to a multiple of
4 (its outer-dim-major scale then has 16-byte aligned columns, as PyTorch pads the 128x128 scales'
K blocks to 4); a 1x128 ``mat_b``'s rows to 16 (ATen's rule for ``mat_b``). Padding rows are zeros
with scale 1 and are cropped from the output. Quantization is the emulation's PyTorch code, eager, so
the bytes are the emulation's on every device; a fused quantizer (``torch.compile`` or Triton) is
left for when a GPU can show its bytes equal these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import (
    TILE,
    FP8Gemm,
    FP8GroupedGemm,
    Quantized,
    _cropped,
    _expert_padded_rows,
    dequantize,
    quantize,
)
from .scaled_mm_reference import ScalingType, round_up

BLOCK_1x128, BLOCK_128x128 = ScalingType.BlockWise1x128, ScalingType.BlockWise128x128


def cuda_scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
    return F.scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=output_dtype)


KERNEL = cuda_scaled_mm  # the seam: (mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype) -> [M, N]


def unavailable_reason() -> str | None:
    """None where ``F.scaled_mm`` runs DeepSeek's block-wise recipe (CUDA SM 9.x, CUDA >= 12.9), else why."""
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with block-wise recipes"
    if not torch.cuda.is_available():
        return "torch._scaled_mm's block-wise FP8 needs a CUDA GPU"
    capability = torch.cuda.get_device_capability()
    if capability[0] != 9:
        return (f"torch._scaled_mm's 1x128/128x128 scaling runs on SM90 (Hopper) only, this GPU is "
                f"SM{capability[0]}{capability[1]}")
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return f"torch._scaled_mm's block-wise FP8 needs cuBLASLt >= 12.9, this torch is built with CUDA {torch.version.cuda}"
    return None


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def _pad_rows(data: torch.Tensor, scale: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128-tiled ``data`` [R, K'] and ``scale`` [R, K'/128] with zero rows (scale 1) appended up to a
    multiple of ``multiple``, ``data`` row-major (a quantized transpose can come out column-major)."""
    if data.stride(-1) != 1:
        data = data.contiguous()
    extra = -data.shape[0] % multiple
    if not extra:
        return data, scale
    padded = data.new_zeros(data.shape[0] + extra, data.shape[1])
    padded[: data.shape[0]] = data
    return padded, torch.cat([scale, scale.new_ones(extra, scale.shape[1])])


def _outer_dim_major(scale: torch.Tensor) -> torch.Tensor:
    """[R, K/128] with strides (1, R), in storage of its own (a slice's offset pointer never reaches the
    kernel, not even where ``.contiguous()`` would pass a one-column slice through)."""
    return scale.t().clone(memory_format=torch.contiguous_format).t()


def a_operand(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mat_a`` and ``scale_a`` of 1x128 tiles [R, K'] (row-major, rows padded to 4): the scale
    outer-dim-major, [R, K'/128] with strides (1, R)."""
    data, scale = _pad_rows(data, scale, 4)
    return data, _outer_dim_major(scale)


def b_operand_tiles(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mat_b`` and ``scale_b`` of 1x128 tiles of B [N, K'] (rows padded to 16): ``mat_b`` is B's
    column-major [K', N] view, the scale [N, K'/128] outer-dim-major, strides (1, N)."""
    data, scale = _pad_rows(data, scale, 16)
    return data.t(), _outer_dim_major(scale)


def b_operand_blocks(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mat_b`` and ``scale_b`` of 128x128 blocks of B [N', K'] (row-major; N', K' multiples of 128):
    ``mat_b`` is the column-major [K', N'] view, the scale [N'/128, K'/128] padded to L4 K blocks and
    transposed: [L4, N'/128] with strides (1, L4)."""
    nb, kb = scale.shape
    padded = scale.new_zeros(nb, round_up(kb, 4))
    padded[:, :kb] = scale
    return data.contiguous().t(), padded.t()


def _mm_blocks(a_data, a_scale, b_data, b_scale, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """1x128 tiles A [M, K'] times 128x128 blocks B [N', K'] transposed: [rows, cols] in ``dtype``."""
    mat_a, scale_a = a_operand(a_data, a_scale)
    mat_b, scale_b = b_operand_blocks(b_data, b_scale)
    out = KERNEL(mat_a, mat_b, scale_a, BLOCK_1x128, scale_b, BLOCK_128x128, _output_dtype(dtype))
    return _cropped(out, rows, cols).to(dtype)


def _mm_tiles(a_data, a_scale, b_data, b_scale, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """1x128 tiles A [M, K'] times 1x128 tiles B [N, K'] transposed: [rows, cols] in ``dtype``."""
    mat_a, scale_a = a_operand(a_data, a_scale)
    mat_b, scale_b = b_operand_tiles(b_data, b_scale)
    out = KERNEL(mat_a, mat_b, scale_a, BLOCK_1x128, scale_b, BLOCK_1x128, _output_dtype(dtype))
    return _cropped(out, rows, cols).to(dtype)


def _transposed_blocks(w: Quantized) -> Quantized:
    """W^T of a 128x128-block weight in row-major storage of its own (the GPU reads B row by row of
    B^T; the emulation's transposed view is not that)."""
    t = w.transposed()
    return Quantized(t.data.contiguous(), t.scale.contiguous(), t.rows, t.cols, TILE)


def _wgrad_operands(dy: torch.Tensor, x: torch.Tensor, p2: bool) -> tuple[Quantized, Quantized]:
    """dy^T [N, T] and x^T [K, T] in 1x128 tiles along the tokens (the 128x1 tiles of Wgrad), stored
    row-major."""
    dyt, xt = quantize(dy.T, 1, p2), quantize(x.T, 1, p2)
    for q in (dyt, xt):
        q.data = q.data.contiguous()
    return dyt, xt


class TorchFP8Gemm(FP8Gemm):
    """``FP8Gemm`` (same quantization, same kept FP8 input) with its three GEMMs on ``KERNEL``."""

    def fprop(self, kept, weight: Quantized, counts=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        data, scale = kept
        return _mm_blocks(data, scale, weight.data, weight.scale, data.shape[0], weight.rows, dtype)

    def dgrad(self, dy: torch.Tensor, weight: Quantized, counts=None, dtype: torch.dtype = torch.float32):
        q, wt = quantize(dy, 1, self.power_of_two), _transposed_blocks(weight)
        return _mm_blocks(q.data, q.scale, wt.data, wt.scale, dy.shape[0], wt.rows, dtype)

    def wgrad(self, dy: torch.Tensor, kept, counts, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        data, scale = kept
        x = dequantize(Quantized(data, scale, data.shape[0], cols, 1))
        dyt, xt = _wgrad_operands(dy, x, self.power_of_two)
        return _mm_tiles(dyt.data, dyt.scale, xt.data, xt.scale, dyt.rows, xt.rows, dtype)


class _TorchFP8Linear(torch.autograd.Function):
    """``plugins.precision.fp8._FP8Linear`` with the GEMMs of ``TorchFP8Gemm``; outputs written by the
    kernel in the activations' (Fprop, Dgrad) and the weight's (Wgrad) dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, power_of_two: bool) -> torch.Tensor:
        gemm = TorchFP8Gemm(power_of_two)
        kept, wq = gemm.keep(x), gemm.prepare(weight)
        ctx.save_for_backward(*kept, wq.data, wq.scale)
        ctx.meta = (gemm, x.shape, weight.shape, x.dtype, weight.dtype)
        return gemm.fprop(kept, wq, dtype=x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        gemm, x_shape, w_shape, x_dtype, w_dtype = ctx.meta
        wq = Quantized(w_data, w_scale, w_shape[0], w_shape[1], TILE)
        dy = grad.reshape(x_data.shape[0], w_shape[0])
        dx = gemm.dgrad(dy, wq, dtype=x_dtype).view(x_shape)
        return dx, gemm.wgrad(dy, (x_data, x_scale), None, w_shape[1], dtype=w_dtype), None


def _segments(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of every non-empty expert segment (one read of ``counts`` to the host)."""
    out, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            out.append((expert, start, count))
        start += count
    return out


class TorchFP8GroupedGemm(FP8GroupedGemm):
    """``FP8GroupedGemm`` with one ``KERNEL`` call per non-empty expert segment."""

    def fprop(self, kept, weight: Quantized, counts: torch.Tensor, dtype: torch.dtype = torch.float32):
        data, scale = kept
        return self._per_expert(data, scale, weight, counts, dtype)

    def dgrad(self, dy: torch.Tensor, weight: Quantized, counts: torch.Tensor, dtype: torch.dtype = torch.float32):
        q = quantize(dy, 1, self.power_of_two)
        t = weight.transposed()
        wt = Quantized(t.data.contiguous(), t.scale.contiguous(), t.rows, t.cols, TILE)
        return self._per_expert(q.data, q.scale, wt, counts, dtype)

    @staticmethod
    def _per_expert(data, scale, weight: Quantized, counts, dtype) -> torch.Tensor:
        out = torch.zeros(data.shape[0], weight.rows, dtype=dtype, device=data.device)
        for expert, start, rows in _segments(counts):
            out[start: start + rows] = _mm_blocks(data[start: start + rows], scale[start: start + rows],
                                                  weight.data[expert], weight.scale[expert], rows, weight.rows, dtype)
        return out

    def wgrad(self, dy: torch.Tensor, kept, counts: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32):
        data, scale = kept
        tokens, n = dy.shape
        destination, _, length = _expert_padded_rows(counts)
        x = dequantize(Quantized(data, scale, tokens, cols, 1))
        x_padded = x.new_zeros(length, cols).index_copy(0, destination, x)
        dy_padded = dy.new_zeros(length, n, dtype=torch.float32).index_copy(0, destination, dy.float())
        dyt, xt = _wgrad_operands(dy_padded, x_padded, self.power_of_two)
        out = torch.zeros(len(counts), n, cols, dtype=dtype, device=dy.device)
        start = 0
        for expert, count in enumerate(counts.tolist()):  # each expert's tokens: whole 128-token tiles of its own
            width = round_up(count, TILE)
            if width:
                tiles = slice(start // TILE, (start + width) // TILE)
                out[expert] = _mm_tiles(dyt.data[:, start: start + width], dyt.scale[:, tiles],
                                        xt.data[:, start: start + width], xt.scale[:, tiles], n, cols, dtype)
            start += width
        return out


class _TorchFP8GroupedLinear(torch.autograd.Function):
    """``plugins.precision.fp8._FP8GroupedLinear`` with the GEMMs of ``TorchFP8GroupedGemm``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, power_of_two: bool):
        gemm = TorchFP8GroupedGemm(power_of_two)
        kept = gemm.keep(x)
        ctx.save_for_backward(*kept, counts)
        ctx.meta = (gemm, gemm.prepare(weight), x.shape[-1], x.dtype, weight.dtype)
        return gemm.fprop(kept, ctx.meta[1], counts, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        data, scale, counts = ctx.saved_tensors
        gemm, wq, cols, x_dtype, w_dtype = ctx.meta
        dx = gemm.dgrad(grad, wq, counts, dtype=x_dtype)
        return dx, gemm.wgrad(grad, (data, scale), counts, cols, dtype=w_dtype), None, None


def torch_fp8_linear(x: torch.Tensor, weight: torch.Tensor, power_of_two: bool = True) -> torch.Tensor:
    """``x @ weight.T`` with DeepSeek-V3's FP8 recipe on ``KERNEL``."""
    return _TorchFP8Linear.apply(x, weight, power_of_two)


def torch_fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, power_of_two: bool = True):
    """Expert-sorted rows ``x`` [M, K] (``counts`` [E] per expert) times ``weight`` [E, N, K] transposed."""
    return _TorchFP8GroupedLinear.apply(x, weight, counts, power_of_two)
