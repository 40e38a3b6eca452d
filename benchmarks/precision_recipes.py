"""The precision recipes side by side on the tiny recipe through the launcher (one rank): fp32, bf16
(report 3.3: BF16 GEMMs, FP32 masters and gradient accumulation) and FP8 (emulated) on bf16, the
report's comparison (Figure 10: FP8's relative loss error against BF16 below 0.25%). Prints a table
of each recipe's loss (mean of the last 10 steps), its gap to fp32 and to bf16, and its median step
time with the ratio to fp32; writes JSON.

    python benchmarks/precision_recipes.py --steps 120
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"fp32": ("--set", "train.precision=fp32"), "bf16": ("--set", "train.precision=bf16"),
           "fp8 on bf16": ("--set", "train.precision=bf16", "--fp8", "emulated")}


def train(recipe: str, run_dir: Path, steps: int, lr: float) -> list[dict]:
    command = [sys.executable, "launch/pretrain.py", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
               "--steps", str(steps), "--set", "train.wandb_mode=disabled", "--set", "train.eval_interval=0",
               "--set", f"train.lr.peak={lr}", "--save-interval", str(10 * steps), *RECIPES[recipe]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"{recipe}: the launcher failed:\n{result.stderr[-2000:]}")
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr (the recipe's 3e-3 is chaotic early on)")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the step times")
    parser.add_argument("--output", default="benchmarks/results/precision_recipes.json")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        for recipe in RECIPES:
            print(f"training {recipe} for {args.steps} steps ...", flush=True)
            records = train(recipe, Path(directory) / recipe.replace(" ", "_"), args.steps, args.lr)
            seconds = [(r["tokens"] - before["tokens"]) / r["tokens_per_s"]
                       for before, r in zip(records[args.skip:], records[args.skip + 1:])]
            rows[recipe] = {"loss_last10": statistics.mean(r["loss"] for r in records[-10:]),
                            "lm_loss_last10": statistics.mean(r["lm_loss"] for r in records[-10:]),
                            "step_seconds_median": statistics.median(seconds)}
    for row in rows.values():
        row["gap_to_fp32"] = row["loss_last10"] / rows["fp32"]["loss_last10"] - 1
        row["gap_to_bf16"] = row["loss_last10"] / rows["bf16"]["loss_last10"] - 1
        row["time_vs_fp32"] = row["step_seconds_median"] / rows["fp32"]["step_seconds_median"]
    print(f"\ntiny recipe, {args.steps} steps at peak lr {args.lr}, one rank on {platform.processor() or 'CPU'} "
          f"({torch.get_num_threads()} threads)")
    print("| recipe | loss (last 10) | vs fp32 | vs bf16 | step s (median) | time vs fp32 |")
    print("|---|---|---|---|---|---|")
    for recipe, row in rows.items():
        print(f"| {recipe} | {row['loss_last10']:.5f} | {row['gap_to_fp32']:+.3%} | {row['gap_to_bf16']:+.3%} | "
              f"{row['step_seconds_median']:.3f} | {row['time_vs_fp32']:.2f}x |")
    write_result(args.output, {"steps": args.steps, "lr": args.lr, "threads": torch.get_num_threads(), "recipes": rows})


if __name__ == "__main__":
    main()
