"""A CPU reference of ``torch.nn.functional.scaled_mm``'s block-wise FP8 contract (DeepSeek's recipe).

``plugins.precision.fp8_torch`` runs the report's FP8 GEMMs through ``F.scaled_mm`` (ATen's
``_scaled_mm_v2``, cuBLASLt >= 12.9 on SM90). cuBLASLt reads the operands and their scales through
layouts a CPU never sees, and a scale laid out wrongly but with the right element count multiplies
the wrong blocks without any error. This module is that contract written out for the CPU: it takes
exactly the arguments the backend hands the GPU, rejects what ATen rejects, and computes the product.

The contract, as PyTorch's own CUDA test defines it (``test/test_scaled_matmul_cuda.py``,
``test_scaled_mm_block_wise_numerics``) and ATen checks it (``ScaledBlas.cpp``:
``_scaled_block1x128_block128x128`` and its two siblings; ``torch/_meta_registrations.py``'s
``_check_scaled_mm_sizes_v2``), for ``mat_a`` [M, K] times ``mat_b`` [K, N]:

- operands FP8 (not both E5M2), 2-D; ``mat_a`` row-major, ``mat_b`` column-major (``B.t()`` of a
  row-major [N, K]); ``K % 16 == 0`` and both dims of ``mat_b`` multiples of 16;
- scales float32, one per block, holding the *decode* factor (value = fp8 x scale), and:

  ========================  ===============================  ===========================
  recipe                    shape                            strides
  ========================  ===============================  ===========================
  ``scale_a`` 1x128         [M, ceil(K/128)]                 (1, M): outer-dim-major
  ``scale_a`` 128x128       [L4, ceil(M/128)]                (1, L4)
  ``scale_b`` 1x128         [N, ceil(K/128)]                 (1, N): outer-dim-major
  ``scale_b`` 128x128       [L4, ceil(N/128)]                (1, L4)
  ========================  ===============================  ===========================

  with ``L4 = round_up(ceil(K/128), 4)``: a 128x128 block scale is the row-major
  [blocks of rows, K blocks] matrix padded to 4 K blocks (16 bytes, what cuBLASLt's loads need) and
  transposed. A stride is not checked along a dimension of size 1 (ATen's relaxation);
- the recipe pairs (1x128, 128x128), (128x128, 1x128) and (1x128, 1x128); output bf16 or float32;
- beyond ATen's checks, cuBLASLt's: every pointer (operands and scales) 16-byte aligned, which a
  slice of a larger tensor need not be (ATen passes ``data_ptr()`` through).

The product: each 128-wide K block's partial sum of FP8 products, exact (every E4M3 product has at
most 8 significant bits within 2^-18..2^18, so 128 of them add up exactly in float64), rounded once
to float32, multiplied by its row's scale of A and its column's scale of B, and accumulated in
float32 in K order: the promotion to FP32 every 128 elements of the report (3.3.2), with the
Tensor Cores' partial sums taken as exact. The emulation (``plugins.precision.fp8``) sums the block
in float32 instead; ``accumulation_bound`` bounds the difference.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

TILE = 128
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUTPUT_TYPES = (torch.bfloat16, torch.float32)


class _ScalingType(enum.IntEnum):
    """``F.ScalingType``'s values, for a torch without it (the reference then still runs)."""

    TensorWise = 0
    RowWise = 1
    BlockWise1x16 = 2
    BlockWise1x32 = 3
    BlockWise1x128 = 4
    BlockWise128x128 = 5


ScalingType = getattr(F, "ScalingType", _ScalingType)
PAIRS = (
    (ScalingType.BlockWise1x128, ScalingType.BlockWise128x128),
    (ScalingType.BlockWise128x128, ScalingType.BlockWise1x128),
    (ScalingType.BlockWise1x128, ScalingType.BlockWise1x128),
)


class LayoutError(ValueError):
    """Arguments cuBLASLt's block-wise scaled GEMM (as ATen checks it) does not take."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    return _ceil_div(a, multiple) * multiple


def _size_stride_ok(t: torch.Tensor, dim: int, size: int, stride: int) -> bool:
    return t.shape[dim] == size and (size <= 1 or t.stride(dim) == stride)


def expected_scale(recipe: ScalingType, outer: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(shape, strides) of the scale of an operand with ``outer`` rows (M of A, N of B) and ``k``."""
    kb = _ceil_div(k, TILE)
    if recipe == ScalingType.BlockWise1x128:
        return (outer, kb), (1, outer)
    if recipe == ScalingType.BlockWise128x128:
        l4 = round_up(kb, 4)
        return (l4, _ceil_div(outer, TILE)), (1, l4)
    raise LayoutError(f"{recipe}: only the block-wise 1x128 and 128x128 recipes are modelled here")


def check_layout(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16) -> None:
    """Raise ``LayoutError`` for arguments ATen's block-wise ``_scaled_mm_v2`` rejects on SM90."""
    if mat_a.dim() != 2 or mat_b.dim() != 2:
        raise LayoutError(f"operands must be 2-D, got {tuple(mat_a.shape)} and {tuple(mat_b.shape)}")
    if mat_a.dtype not in FP8_TYPES or mat_b.dtype not in FP8_TYPES:
        raise LayoutError(f"operands must be FP8, got {mat_a.dtype} and {mat_b.dtype}")
    if mat_a.dtype == mat_b.dtype == torch.float8_e5m2:
        raise LayoutError("two E5M2 operands are not supported")
    m, k = mat_a.shape
    if mat_b.shape[0] != k:
        raise LayoutError(f"shapes cannot be multiplied: {tuple(mat_a.shape)} and {tuple(mat_b.shape)}")
    n = mat_b.shape[1]
    if m and k and not mat_a.stride(0) > mat_a.stride(1) == 1:
        raise LayoutError(f"mat_a must be row-major, got strides {mat_a.stride()}")
    if k and n and not mat_b.stride(1) > mat_b.stride(0) == 1:
        raise LayoutError(f"mat_b must be column-major (B.t() of a row-major [N, K]), got strides {mat_b.stride()}")
    if k % 16 or n % 16:
        raise LayoutError(f"K and N must be multiples of 16, got K={k}, N={n}")
    pair = (ScalingType(recipe_a), ScalingType(recipe_b))
    if pair not in PAIRS:
        raise LayoutError(f"recipes {pair[0].name} x {pair[1].name}: cuBLASLt takes 1x128 x 128x128, "
                          "128x128 x 1x128 and 1x128 x 1x128")
    for name, scale, recipe, outer in (("scale_a", scale_a, pair[0], m), ("scale_b", scale_b, pair[1], n)):
        shape, strides = expected_scale(recipe, outer, k)
        if scale.dtype != torch.float32:
            raise LayoutError(f"{name} must be float32, got {scale.dtype}")
        if scale.dim() != 2 or not all(_size_stride_ok(scale, d, shape[d], strides[d]) for d in (0, 1)):
            raise LayoutError(f"{name} ({recipe.name}) must have shape {list(shape)} and strides {list(strides)}, "
                              f"got {list(scale.shape)} and {list(scale.stride())}")
    if output_dtype not in OUTPUT_TYPES:
        raise LayoutError(f"output dtype must be bfloat16 or float32, got {output_dtype}")
    for name, t in (("mat_a", mat_a), ("mat_b", mat_b), ("scale_a", scale_a), ("scale_b", scale_b)):
        if t.device.type != "meta" and t.numel() and t.data_ptr() % 16:
            raise LayoutError(f"{name} starts {t.data_ptr() % 16} bytes off a 16-byte boundary (cuBLASLt's FP8 "
                              "alignment: ATen passes the pointer through)")


def _block_scales(scale: torch.Tensor, recipe: ScalingType, outer: int, k_blocks: int) -> torch.Tensor:
    """The decode scale of every row (of A, or of B as [N, K]) for every K block: [outer, K blocks]."""
    if recipe == ScalingType.BlockWise1x128:
        return scale[:, :k_blocks]
    return scale.t()[:, :k_blocks].repeat_interleave(TILE, dim=0)[:outer]


def reference_scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16):
    """``F.scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=...)`` on any
    device, for the block-wise recipes: layouts checked (``check_layout``), then the product as the
    module docstring defines it. Returns [M, N] in ``output_dtype``."""
    check_layout(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype)
    (m, k), n = mat_a.shape, mat_b.shape[1]
    kb = _ceil_div(k, TILE)
    sa = _block_scales(scale_a, ScalingType(recipe_a), m, kb)
    sb = _block_scales(scale_b, ScalingType(recipe_b), n, kb)
    out = torch.zeros(m, n, dtype=torch.float32, device=mat_a.device)
    for b in range(kb):
        cols = slice(b * TILE, min(k, (b + 1) * TILE))
        partial = (mat_a[:, cols].double() @ mat_b[cols, :].double()).float()  # exact, then rounded once
        out += partial * sa[:, b, None] * sb[None, :, b]
    return out.to(output_dtype)


def accumulation_bound(a_abs: torch.Tensor, b_abs: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """How far a float32 block-scaled GEMM may lie from ``reference_scaled_mm`` (before the output
    cast): a 128-term block sum in float32 is off its exact value by at most 127u of the sum of the
    magnitudes (u = 2^-24), its rounding to float32 and a general (not power-of-two) scale add 3u, and
    the two K-ordered float32 accumulations (this one and the reference's) at most k_blocks u each.
    ``a_abs`` [M, K] and ``b_abs`` [N, K] are the dequantized magnitudes."""
    u = 2.0 ** -24
    return (TILE + 3 + 2 * k_blocks + 4) * u * (a_abs.double() @ b_abs.double().T)
