"""DeepSeek-V3 671B at the report's layout (PP16 DualPipe x EP64 x DP128, micro-batch 1 x 4096,
selective recomputation, FP8, BF16 moments) on 80 GB GPUs: the planner's largest rank, every term,
as the ``train.memory`` switches are turned on one after another; and the bytes one MoE block keeps
per token at the report's shape, part by part. Nothing runs on a GPU: this is ``launch.plan``'s
count of what the trainer holds (``launch.planning.rank_memory``), so each switch shows what it
buys on paper.

    python benchmarks/plan_671b.py [--fp8 emulated] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.config.run_config import MemoryConfig, load_run_config  # noqa: E402
from launch.planning.estimate import estimate  # noqa: E402
from launch.planning.rank_memory import Precision, block_activation_bytes, kept  # noqa: E402

GB = 1e9
LAYOUT = ["parallel.pp=16", "parallel.ep=64", "parallel.pipeline_schedule=dualpipe", "train.micro_batch_size=1",
          "data.seq_len=4096", "train.recompute=selective", "train.optimizer_moments_dtype=bfloat16"]
OFF = MemoryConfig(weighted_combine=False, swiglu_recompute=False, fp8_activations=False, fp8_dispatch=False,
                   release_sends=False, loss_chunk_tokens=0, offload_ffn=False)
STEPS = [("none of the switches", {}), ("+ weighted combine", {"weighted_combine": True}),
         ("+ recomputed SwiGLU", {"swiglu_recompute": True}), ("+ FP8 SwiGLU input", {"fp8_activations": True}),
         ("+ FP8 dispatch", {"fp8_dispatch": True}),
         ("+ sends released", {"release_sends": True}), ("+ chunked cross-entropy", {"loss_chunk_tokens": 1024}),
         ("+ FFN offload to host", {"offload_ffn": True})]
TERMS = ["parameters_bytes", "fp8_weights_bytes", "gradients_bytes", "master_weights_bytes", "moments_bytes",
         "activations_bytes", "communication_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp8", default="emulated", choices=["emulated", "te"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/plan_671b.json"))
    args = parser.parse_args()
    base = load_run_config(ROOT / "configs" / "deepseek_v3_671b.yaml", [*LAYOUT, f"parallel.fp8={args.fp8}"])
    memory, rows, cases = OFF, [], []
    head = "| switches | rank | " + " | ".join(t.removesuffix("_bytes").replace("_", " ") for t in TERMS) + \
        " | total | host (offload) | fits 80 GB |"
    rows += [head, "|---" * (len(TERMS) + 5) + "|"]
    for label, change in STEPS:
        memory = dataclasses.replace(memory, **change)
        run = dataclasses.replace(base, train=dataclasses.replace(base.train, memory=memory))
        plan = estimate(run, 128, "gpu", 80.0)
        largest = plan["ranks"][plan["largest_rank"]]
        cases.append({"switches": label, "memory": dataclasses.asdict(memory), "largest_rank": plan["largest_rank"],
                      "ranks": plan["ranks"], "fits": plan["fits"]})
        rows.append(f"| {label} | {plan['largest_rank']} | " + " | ".join(f"{largest[t] / GB:.1f}" for t in TERMS) +
                    f" | **{largest['total_bytes'] / GB:.1f}** | {largest['offload_host_bytes'] / GB:.1f} | "
                    f"{'yes' if plan['fits'] else 'no'} |")
    last = cases[-1]["ranks"][cases[-1]["largest_rank"]]
    rows.append(f"\nwith every switch: {last['offload_bytes_per_step'] / GB:.0f} GB per step copied each way "
                f"between the largest rank's GPU and host memory")
    precision = Precision.of("gpu", "bfloat16", args.fp8, base.parallel.fp8_modules)
    blocks = {label: block_activation_bytes(base.model, True, precision,
                                            dataclasses.replace(OFF, **dict(kv for _, c in STEPS[:i + 1]
                                                                            for kv in c.items())))
              for i, (label, _) in enumerate(STEPS)}
    kinds = ["input", "norm", "norm_out", "up", "other", "ffn"]
    rows.append("\n| one MoE block, KB per token | " + " | ".join(kinds) + " | total | kept (selective, on the GPU) |")
    rows.append("|---" * (len(kinds) + 3) + "|")
    for (label, parts), memory in zip(blocks.items(), (c["memory"] for c in cases)):
        rows.append(f"| {label} | " + " | ".join(f"{parts.get(k, 0.0) / 1024:.1f}" for k in kinds) +
                    f" | {sum(parts.values()) / 1024:.1f} | "
                    f"{kept(parts, 'selective', memory['offload_ffn']) / 1024:.1f} |")
    table = "\n".join(rows)
    print(table)
    write_result(args.out, {"fp8": args.fp8, "cases": cases, "moe_block_bytes_per_token": blocks, "table": table})


if __name__ == "__main__":
    main()
