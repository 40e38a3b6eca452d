"""DeepSeek-V3 671B at the report's layout (PP16 DualPipe x EP64 x DP128 = 2,048 GPUs, micro-batch
1 x 4096, 15,360 sequences a step, selective recomputation, FP8, BF16 moments, the config's
``train.memory``) through the step-time model on each hardware profile of ``configs/hardware/``:
the step, its breakdown, tokens/s per GPU and MFU, beside the published throughputs. Nothing runs on
a GPU: this is ``launch.plan --hardware``'s model (``launch.planning.step_time``).

    python benchmarks/time_671b.py [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.config.run_config import load_run_config  # noqa: E402
from launch.planning.estimate import estimate  # noqa: E402
from launch.planning.hardware import load_hardware  # noqa: E402
from launch.planning.step_time import step_time  # noqa: E402

LAYOUT = ["parallel.pp=16", "parallel.ep=64", "parallel.pipeline_schedule=dualpipe", "train.micro_batch_size=1",
          "data.seq_len=4096", "train.recompute=selective", "parallel.fp8=emulated",
          "train.optimizer_moments_dtype=bfloat16"]
PUBLISHED = {"h800": "report ~1,540 (180K GPU-hours per trillion tokens)",
             "h100": "Megatron-Bridge 1,297 (TP2 PP8 VPP4 EP64, FP8 blockwise)",
             "b200": "Megatron-Bridge 3,328; TorchTitan 918"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_671b.json"))
    args = parser.parse_args()
    run = load_run_config(ROOT / "configs" / "deepseek_v3_671b.yaml", LAYOUT)
    plan = estimate(run, 128, "gpu", 80.0)
    rows = {}
    print("| profile | step | compute | exposed communication | bubble | optimizer | offload | tokens/s per GPU | "
          "MFU | published |\n|---|---|---|---|---|---|---|---|---|---|")
    for name in ("h800", "h100", "h200", "b200"):
        t = step_time(run, plan, load_hardware(name))
        rows[name] = t
        b = t["breakdown"]
        print(f"| {name} | {t['step_seconds']:.1f} s | {b['compute']:.2f} s | {b['exposed_communication']:.2f} s | "
              f"{b['bubble']:.2f} s | {b['optimizer']:.2f} s | {b['offload']:.2f} s | "
              f"{t['tokens_per_second_per_gpu']:,.0f} | {100 * t['mfu']:.1f}% | {PUBLISHED.get(name, '-')} |")
    write_result(args.out, {"layout": LAYOUT, "fits": plan["fits"],
                            "largest_rank_total_bytes": plan["largest_rank_total_bytes"], "profiles": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
