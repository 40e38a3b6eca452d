"""DeepSeek's FP8 release format, the one the official V3 weights ship in: every linear weight of
attention, dense FFNs, shared and routed experts is ``float8_e4m3fn`` beside a float32
``NAME.weight_scale_inv`` holding one scale per 128x128 block (``ceil(rows/128) x ceil(cols/128)``;
value = fp8 x its block's scale, the semantics of DeepSeek's ``inference/kernel.py``
``weight_dequant``); router weights, norms, embedding, head and the MTP ``eh_proj`` stay BF16,
the router bias FP32; config.json carries :data:`QUANTIZATION_CONFIG`.

Writing quantises with the release's rule, ``scale = block amax / 448`` (no power-of-two rounding,
unlike the training emulation's default); an all-zero block gets scale 1 where DeepSeek's kernel
would divide 0 by 0. Reading checks every FP8 tensor against its scale from the safetensors headers
alone, before any tensor is read, and dequantises one tensor at a time."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError
from ..precision.fp8 import TILE, quantize

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [TILE, TILE]}
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = "F8_E4M3"  # the safetensors header's name of float8_e4m3fn

# The linears the release quantises: attention's projections, the dense FFNs', the shared and the
# routed experts' (the MTP module's block included: it is a layer like the others).
_RELEASE_QUANTIZED = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight")
# Read as FP8 too: the MTP module's eh_proj, a linear that other DeepseekV3 checkpoints quantise.
_READ_QUANTIZED = re.compile(r"model\.layers\.\d+\.eh_proj\.weight")


def is_release_quantized(key: str) -> bool:
    """Whether the release stores HF tensor ``key`` in FP8."""
    return _RELEASE_QUANTIZED.fullmatch(key) is not None


def may_be_fp8(key: str) -> bool:
    """Whether a reader accepts ``key`` in FP8 (the release's linears and the MTP ``eh_proj``)."""
    return is_release_quantized(key) or _READ_QUANTIZED.fullmatch(key) is not None


def check_quantization_config(raw: dict, source: str) -> bool:
    """Whether a config.json declares the release's FP8 format; any other quantization is an error
    naming the field."""
    quant = raw.get("quantization_config")
    if quant is None:
        return False
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: quantization_config: expected a mapping, got {quant!r}")
    for key, expected in QUANTIZATION_CONFIG.items():
        got = quant.get(key, expected if key in ("fmt", "activation_scheme") else None)  # those two may be left out
        if got != expected:
            raise ConfigError(f"{source}: quantization_config.{key}: expected {expected!r} (DeepSeek's FP8 "
                              f"release format), got {got!r}")
    return True


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The shape of a [rows, cols] weight's block scales: ``ceil(rows/128) x ceil(cols/128)``."""
    return math.ceil(shape[0] / TILE), math.ceil(shape[1] / TILE)


def check_tensors(headers: dict[str, tuple[Path, str, tuple[int, ...]]], fp8: bool, config_path: Path) -> dict[str, str]:
    """Check a checkpoint's FP8 weights and scales from their headers (key -> (file, dtype, shape)):
    each FP8 tensor is a linear the format quantises, under a config that declares it, with a 2-D
    scale of its block grid; each scale belongs to an FP8 weight; under the format every linear it
    quantises is FP8. Returns {FP8 weight key: scale key}."""
    scales = {}
    for key, (path, dtype, shape) in headers.items():
        if key.endswith(SCALE_SUFFIX):
            weight = key[: -len(SCALE_SUFFIX)]
            if headers.get(weight, (None, ""))[1] != FP8_DTYPE:
                raise ConfigError(f"{path}: {key}: a block scale without an FP8 weight {weight}")
            continue
        if dtype.startswith("F8_") and dtype != FP8_DTYPE:
            raise ConfigError(f"{path}: {key}: {dtype}, expected {FP8_DTYPE} (float8_e4m3fn, the release's fmt e4m3)")
        if dtype != FP8_DTYPE:
            if fp8 and is_release_quantized(key):
                raise ConfigError(f"{path}: {key}: {dtype} without block scales where {config_path}'s "
                                  "quantization_config promises float8_e4m3fn with its weight_scale_inv "
                                  "(a damaged or foreign release)")
            continue
        if not may_be_fp8(key):
            raise ConfigError(f"{path}: {key}: float8_e4m3fn where the FP8 release format keeps BF16 (only "
                              "the linear weights of attention, FFNs and experts are FP8)")
        if not fp8:
            raise ConfigError(f"{path}: {key}: float8_e4m3fn, but {config_path} has no quantization_config "
                              f"(expected {QUANTIZATION_CONFIG})")
        scale = key + SCALE_SUFFIX
        if scale not in headers:
            raise ConfigError(f"{path}: {key}: FP8 weight without its block scales {scale}")
        scale_path, _, got = headers[scale]
        if len(shape) != 2 or tuple(got) != scale_shape(shape):
            expected = scale_shape(shape) if len(shape) == 2 else "a 2-D weight"
            raise ConfigError(f"{scale_path}: {scale}: shape {tuple(got)}, expected {expected} "
                              f"(one scale per 128x128 block of the weight's {tuple(shape)})")
        scales[key] = scale
    return scales


def dequantize(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP32 values of a [rows, cols] FP8 weight (on its device): each element times its 128x128 block's scale."""
    out = data.float()
    column_scales = scale.float().repeat_interleave(TILE, 1)[:, : data.shape[1]].to(out.device)
    for i, band_scales in enumerate(column_scales):  # in place, 128 rows at a time: no full-size temporary
        out[i * TILE:(i + 1) * TILE].mul_(band_scales)
    return out


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, cols] weight as (E4M3 data [rows, cols], FP32 scales [ceil(rows/128), ceil(cols/128)]),
    scale = block amax / 448 (the release's rule)."""
    q = quantize(weight, TILE, power_of_two=False)
    return q.data[: q.rows, : q.cols].contiguous(), q.scale.contiguous()


def release_tensors(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The release-format tensors of one HF tensor: a linear the release quantises as FP8 data and
    its block scales, the router bias in FP32, everything else in BF16."""
    if is_release_quantized(key):
        data, scale = quantize_weight(tensor)
        yield key, data
        yield key + SCALE_SUFFIX, scale
    elif key.endswith("e_score_correction_bias"):
        yield key, tensor.float()
    else:
        yield key, tensor.to(torch.bfloat16)

