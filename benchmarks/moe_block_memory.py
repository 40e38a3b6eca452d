"""One DeepSeekMoE block's forward+backward on the CPU with and without the ``train.memory`` switches
(report 3.3.3): the bytes autograd keeps for backward (``saved_tensors_hooks``:
``launch.training.memory.SavedActivations``) and the time of one forward+backward (median of
interleaved repeats), as ratios to the plain block, so the price of the recomputation shows.

    python benchmarks/moe_block_memory.py [--tokens 1024 --hidden 512 --experts 64 --inner 256 --top-k 8 --rounds 10]

Cases: plain; the weighted combine; + the recomputed SwiGLU; and the same three under the emulated
FP8 GEMMs, the last with the SwiGLU input kept in FP8. Limits: float32 on a CPU; the emulated FP8
GEMMs are a numerical oracle, far slower than the native ones, so only the ratios between the FP8
cases say anything about FP8 time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path
from torch import nn

from launch.training.memory import SavedActivations
from plugins.model.config import ModelConfig
from plugins.model.init import init_weights
from plugins.model.moe import DeepSeekMoE, set_ffn_memory
from plugins.precision.policy import convert_to_fp8, keep_fp8_activations

ROOT = Path(__file__).resolve().parents[1]
CASES = {"plain": (False, False, False, False), "weighted combine": (True, False, False, False),
         "+ recomputed SwiGLU": (True, True, False, False), "FP8 plain": (False, False, True, False),
         "FP8 weighted combine": (True, False, True, False),
         "FP8 + recomputed SwiGLU, FP8 input": (True, True, True, True)}


def block(config: ModelConfig, weighted: bool, recompute: bool, fp8: bool, fp8_store: bool) -> nn.Module:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.mlp = DeepSeekMoE(config)
    init_weights(holder, 0.02)
    if fp8:
        convert_to_fp8(holder, "emulated", ["mlp.*"])
    set_ffn_memory(holder, weighted, recompute)
    if fp8_store:
        keep_fp8_activations(holder)
    return holder.mlp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/moe_block_memory.json")
    args = parser.parse_args()
    config = dataclasses.replace(ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml"), hidden_size=args.hidden,
                                 n_routed_experts=args.experts, moe_intermediate_size=args.inner,
                                 num_experts_per_tok=args.top_k, n_group=8, topk_group=4)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    blocks = {name: block(config, *flags) for name, flags in CASES.items()}
    kept = {}
    for name, moe in blocks.items():
        inputs = x.clone().requires_grad_()
        with SavedActivations(moe) as saved:
            out = moe(inputs)
        copies = {t.untyped_storage()._cdata for p in moe.parameters() if hasattr(p, "_fp8_blocks")
                  for t in (p._fp8_blocks[1].data, p._fp8_blocks[1].scale)}
        kept[name] = sum(s.nbytes() for key, (_, s) in saved.storages.items() if key not in copies)
        out.square().mean().backward()

    def step(moe: nn.Module):
        def run():
            out = moe(x.clone().requires_grad_())
            out.square().mean().backward()
            moe.zero_grad(set_to_none=True)
        return run

    times = time_interleaved({name: step(moe) for name, moe in blocks.items()}, args.warmup, args.rounds)
    rows = []
    for name in CASES:
        base = "FP8 plain" if name.startswith("FP8") else "plain"
        seconds = statistics.median(times[name])
        rows.append({"case": name, "kept_bytes": kept[name], "kept_per_token": kept[name] / args.tokens,
                     "kept_ratio": kept[name] / kept[base], "step_ms": 1000 * seconds,
                     "time_ratio": seconds / statistics.median(times[base])})
    print(f"one MoE block: {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts x {args.inner}, "
          f"top-{args.top_k}, float32 on {torch.get_num_threads()} CPU threads")
    print(f"{'case':<38} {'kept KB/token':>14} {'kept ratio':>11} {'fwd+bwd ms':>11} {'time ratio':>11}")
    for r in rows:
        print(f"{r['case']:<38} {r['kept_per_token'] / 1024:>14.2f} {r['kept_ratio']:>11.3f} {r['step_ms']:>11.1f} "
              f"{r['time_ratio']:>11.3f}")
    write_result(args.out, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
