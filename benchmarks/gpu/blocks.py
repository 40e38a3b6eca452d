"""Step 5 of ``run_all.sh``: a few decoder blocks shaped like ``configs/ablation_16b.yaml`` (the first
dense, the others DeepSeekMoE) at sequence 4096, forward + backward, BF16 and FP8 (``--fp8 torch``,
where that backend exists), ``train.compile`` off and on: tokens/s, MFU (the blocks' FLOPs per token
from ``plugins.model.flops`` over the GPU's named dense BF16 peak), peak memory against the planner
(``launch.planning.rank_memory``: weights, gradients and what backward keeps) and the SDPA backend
that ran (report 2.1, 3.3). Writes ``results/blocks.json`` after every variant.

    python benchmarks/gpu/blocks.py                 # GPU
    python benchmarks/gpu/blocks.py --dry-run       # CPU, the tiny config's blocks at sequence 128
    python benchmarks/gpu/blocks.py --dry-run --backend inductor   # the CPU speed ratio of compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from device import ROOT, dense_peak, device, skip, write
from torch import nn

from launch.config.run_config import MemoryConfig
from launch.planning.rank_memory import Precision, block_activation_bytes
from launch.training.parallelize import compile_blocks
from plugins.model.block import DecoderLayer
from plugins.model.config import ModelConfig
from plugins.model.flops import flops_per_token
from plugins.model.init import materialize
from plugins.model.moe import set_ffn_memory
from plugins.model.rope import RotaryEmbedding
from plugins.precision import fp8_torch
from plugins.precision.policy import FP8_BACKENDS, convert_to_fp8

SDPA_OPS = ("flash", "efficient", "cudnn", "math")


def blocks_flops_per_token(config: ModelConfig, blocks: int, seq_len: int) -> float:
    """Training FLOPs of one token through ``blocks`` blocks: the model's count for a model of those
    blocks without MTP, less its output head and final norm."""
    shallow = ModelConfig.from_dict({**config.to_dict(), "num_hidden_layers": blocks, "num_nextn_predict_layers": 0})
    return flops_per_token(shallow, seq_len)["total"] - 6.0 * (config.vocab_size + 1) * config.hidden_size


def planned_bytes(config: ModelConfig, layers: nn.ModuleList, tokens: int, fp8: bool) -> float:
    """Weights and their gradients and the activations backward keeps (the planner's bytes per token)."""
    precision = Precision.of("gpu" if next(layers.parameters()).is_cuda else "cpu", "float32",
                             "torch" if fp8 else "none")
    weights = sum(p.numel() * p.element_size() for p in layers.parameters()) * 2
    kept = sum(sum(block_activation_bytes(config, config.is_moe_layer(i), precision, MemoryConfig()).values())
               for i in range(len(layers)))
    return weights + kept * tokens


def sdpa_backend(step) -> str:
    """Which ``scaled_dot_product_attention`` kernel a step's forward ran, from the profiler's op names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = {event.name for event in prof.events() if "scaled_dot_product" in event.name}
    ran = sorted({kind for kind in SDPA_OPS for name in names if kind in name})
    return ",".join(ran) or ",".join(sorted(names)) or "none seen"


def dtype_on(dev: torch.device) -> torch.dtype:
    """BF16 on a GPU; float32 on CPU (what CPU training runs; CPU BF16 kernels are no measure of a GPU)."""
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def fp8_backend() -> str:
    """``torch`` (the GPU's block-scaled GEMMs) where it runs, else the emulation in its place (the dry run)."""
    return "torch" if fp8_torch.unavailable_reason() is None else "emulated"


def build(config: ModelConfig, blocks: int, dev: torch.device, fp8: bool, compiled: str | None) -> nn.ModuleList:
    with torch.device("meta"):
        layers = nn.ModuleList(DecoderLayer(config, i) for i in range(blocks))
    materialize(layers, dev, config.initializer_range, dtype=dtype_on(dev))
    if fp8:
        convert_to_fp8(layers, fp8_backend())
    set_ffn_memory(layers, MemoryConfig.weighted_combine, MemoryConfig.swiglu_recompute)
    if compiled:
        compile_blocks(layers, backend=compiled)
    return layers


def measure(config, args, dev, fp8: bool, compiled: str | None) -> dict:
    layers = build(config, args.blocks, dev, fp8, compiled)
    rope = RotaryEmbedding(config).to(dev)(torch.arange(args.seq_len, device=dev))
    h = torch.randn(args.batch, args.seq_len, config.hidden_size, device=dev, dtype=dtype_on(dev), requires_grad=True)

    def step():
        out = h
        for layer in layers:
            out = layer(out, rope)
        out.float().square().mean().backward()

    def synced():
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    synced()  # compiles, when compiled
    first = time.perf_counter() - started
    for _ in range(args.warmup):
        synced()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        synced()
        times.append(time.perf_counter() - started)
    tokens = args.batch * args.seq_len
    seconds = statistics.median(times)
    peak, peak_name = dense_peak()
    row = {"precision": "fp8" if fp8 else str(dtype_on(dev)).removeprefix("torch.").replace("bfloat16", "bf16"), "compile": compiled or "off", "step_s": seconds,
           "first_step_s": first, "tokens_per_s": tokens / seconds,
           "flops_per_token": blocks_flops_per_token(config, args.blocks, args.seq_len),
           "sdpa_backend": sdpa_backend(synced), "planned_gib": planned_bytes(config, layers, tokens, fp8) / 2**30}
    row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak if peak else None
    row["mfu_peak"] = peak_name
    row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, the tiny config at sequence 128")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend (default: inductor on a GPU; aot_eager in the dry run, where "
                             "inductor's C++ builds take minutes)")
    args = parser.parse_args()
    dev = device()
    config = ModelConfig.from_yaml(ROOT / "configs" / ("tiny.yaml" if args.dry_run else "ablation_16b.yaml"))
    args.seq_len = args.seq_len or (128 if args.dry_run else 4096)
    args.steps = args.steps or (2 if args.dry_run else 5)
    backend = args.backend or ("aot_eager" if args.dry_run else "inductor")
    precisions = [False] + ([True] if "torch" in FP8_BACKENDS else [])
    if "torch" not in FP8_BACKENDS:
        skip("blocks FP8", "the --fp8 torch backend is not present (plugins.precision.policy.FP8_BACKENDS)")
    elif fp8_backend() != "torch":
        skip("blocks FP8 through --fp8 torch", f"{fp8_torch.unavailable_reason()}; the emulated FP8 runs in its place")
    rows = []
    for fp8 in precisions:
        for compiled in (None, backend):
            if fp8 and compiled and fp8_backend() != "torch":
                skip("compiled FP8 blocks", "dynamo cannot trace the emulation's FP8 autograd (a tile it saves "
                                            "aliases a subgraph's input); the GPU compiles --fp8 torch's")
                continue
            rows.append(measure(config, args, dev, fp8, compiled))
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the variant's blocks are gone with measure's frame
            r = rows[-1]
            mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a"
            peak = f"peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "peak n/a (CPU)"
            print(f"{r['precision']:>4} compile {r['compile']:<9} {r['tokens_per_s']:10.0f} tokens/s  {mfu}  {peak}"
                  f" (planner {r['planned_gib']:.3f} GiB)  SDPA {r['sdpa_backend']}  first step {r['first_step_s']:.1f} s",
                  flush=True)
            write("blocks", args.dry_run, {"args": {**vars(args), "backend": backend}, "device": str(dev), "rows": rows})
    for fp8 in precisions:
        pair = [next((r for r in rows if (r["precision"] == "fp8") == fp8 and (r["compile"] != "off") == c), None)
                for c in (False, True)]
        if None not in pair:
            print(f"compile speed-up ({pair[0]['precision']}, {backend}): "
                  f"{pair[1]['tokens_per_s'] / pair[0]['tokens_per_s']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
