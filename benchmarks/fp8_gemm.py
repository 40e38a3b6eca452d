"""Block-scaled FP8 GEMM (``--fp8 torch``'s kernel, ``F.scaled_mm`` 1x128 x 128x128) against the BF16
matmul, at DeepSeek-V3's shapes: a dense 4096 x 7168 -> 2048 GEMM and one expert's GEMM at 128..2048
tokens (7168 -> 2048). Prints a table, writes JSON.

    python benchmarks/fp8_gemm.py --device cuda      # SM90: BF16 vs FP8 (GEMM alone, and with the 1x128
                                                     # quantization of the activations in the loop)
    python benchmarks/fp8_gemm.py --device cpu       # dry run: toy shapes, BF16 and the CPU reference

Rows: ``bf16`` (``x @ w.T``), ``fp8`` (``F.scaled_mm`` on operands quantized beforehand, the weight's
128x128 blocks and the activations' 1x128 tiles, in the layouts of ``plugins.precision.fp8_torch``),
``fp8+quant`` (the same with the activations quantized by the emulation's eager quantizer each call:
what a step pays today, before any fused quantization kernel). Error: relative Frobenius distance of
the FP8 output from the BF16 one. On a CPU the FP8 kernel does not exist; the dry run times the
BF16 matmul and the reference (``plugins.precision.scaled_mm_reference``) at a toy shape, so the
script's paths are exercised, and says what it skipped.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path

from plugins.precision import fp8_torch
from plugins.precision.fp8 import quantize
from plugins.precision.scaled_mm_reference import reference_scaled_mm

GPU_SHAPES = [("dense 4096x7168->2048", 4096, 7168, 2048)] + [
    (f"expert {t} tokens 7168->2048", t, 7168, 2048) for t in (128, 256, 512, 1024, 2048)]
CPU_SHAPES = [("toy 256x512->256", 256, 512, 256), ("toy expert 128x512->256", 128, 512, 256)]


def _synced(fn, device):
    def step():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out
    return step


def shape_row(name: str, m: int, k: int, n: int, device: torch.device, kernel, warmup: int, rounds: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(torch.bfloat16)
    wq = quantize(w, 128)
    mat_b, scale_b = fp8_torch.b_operand_blocks(wq.data, wq.scale)

    def fp8(xq=None):
        xq = quantize(x, 1) if xq is None else xq
        mat_a, scale_a = fp8_torch.a_operand(xq.data, xq.scale)
        return kernel(mat_a, mat_b, scale_a, fp8_torch.BLOCK_1x128, scale_b, fp8_torch.BLOCK_128x128, torch.bfloat16)

    xq = quantize(x, 1)
    steps = {"bf16": _synced(lambda: x @ w.T, device), "fp8": _synced(lambda: fp8(xq), device),
             "fp8+quant": _synced(fp8, device)}
    times = time_interleaved(steps, warmup, rounds)
    reference = (x @ w.T).float()
    error = ((fp8(xq).float() - reference).norm() / reference.norm()).item()
    flops = 2 * m * k * n
    row = {"shape": name, "m": m, "k": k, "n": n, "fp8_rel_error_vs_bf16": error}
    for backend, ts in times.items():
        ms = statistics.median(ts) * 1e3
        row[f"{backend}_ms"] = ms
        row[f"{backend}_tflops"] = flops / ms / 1e9
    row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
    row["fp8+quant_speedup"] = row["bf16_ms"] / row["fp8+quant_ms"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fp8_gemm_DEVICE.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    skipped = []
    if device.type == "cuda":
        problem = fp8_torch.unavailable_reason()
        if problem:
            raise SystemExit(f"fp8_gemm: --device cuda: {problem}; run --device cpu for the dry run")
        shapes, kernel = GPU_SHAPES, fp8_torch.cuda_scaled_mm
        warmup, rounds = args.warmup or 10, args.rounds or 50
    else:
        shapes, kernel = CPU_SHAPES, reference_scaled_mm
        warmup, rounds = args.warmup or 1, args.rounds or 3
        skipped = [f"the FP8 kernel (F.scaled_mm block-wise): {fp8_torch.unavailable_reason() or 'CPU run'}; "
                   "'fp8' rows time the CPU reference instead",
                   f"the GPU shapes ({', '.join(s[0] for s in GPU_SHAPES)}): a dry run uses toy shapes"]
        for line in skipped:
            print(f"skipped: {line}")
    rows = [shape_row(*shape, device, kernel, warmup, rounds) for shape in shapes]
    header = f"{'shape':<30} {'bf16 ms':>9} {'fp8 ms':>9} {'+quant ms':>10} {'bf16 TF/s':>10} {'fp8 TF/s':>9} " \
             f"{'speedup':>8} {'+quant':>7} {'rel err':>8}"
    print(header)
    for r in rows:
        print(f"{r['shape']:<30} {r['bf16_ms']:>9.3f} {r['fp8_ms']:>9.3f} {r['fp8+quant_ms']:>10.3f} "
              f"{r['bf16_tflops']:>10.1f} {r['fp8_tflops']:>9.1f} {r['fp8_speedup']:>7.2f}x "
              f"{r['fp8+quant_speedup']:>6.2f}x {r['fp8_rel_error_vs_bf16']:>8.4f}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    write_result(args.out or f"benchmarks/results/fp8_gemm_{device.type}.json",
                 {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "warmup": warmup, "rounds": rounds, "skipped": skipped, "rows": rows})


if __name__ == "__main__":
    main()
