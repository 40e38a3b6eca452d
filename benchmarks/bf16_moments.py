"""BF16 AdamW moments (report 3.3.1) on the tiny recipe: N steps through the launcher with FP32 and
with BF16 moments (same seed), against the spread of two FP32 runs with different seeds (the noise
of the comparison). Reports the mean loss of the last ``--window`` steps. Prints a table, writes JSON.

    python benchmarks/bf16_moments.py [--steps 150 --window 10] [--data-dir DIR]

``--data-dir`` reuses a built tiny dataset (DIR/packed, DIR/tokenizer), else one is built in a
temporary directory from the standard library's text (2 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"fp32 seed 0": ("float32", 0), "bf16 seed 0": ("bfloat16", 0), "fp32 seed 1": ("float32", 1)}


def train(run_dir: Path, data: Path, steps: int, moments: str, seed: int) -> list[dict]:
    sets = [f"data.dataset={data / 'packed'}", f"data.tokenizer={data / 'tokenizer'}", "data.builtin_megabytes=2",
            "data.validation={}", "train.wandb_mode=disabled", f"train.optimizer_moments_dtype={moments}",
            f"train.seed={seed}", f"train.save_interval={steps}"]
    command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "1", "launch/pretrain.py", "--config",
               "configs/tiny.yaml", "--steps", str(steps), "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", default="benchmarks/results/bf16_moments.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "data"
        records = {name: train(Path(tmp) / name.replace(" ", "_"), data, args.steps, *spec) for name, spec in RUNS.items()}
    final = {name: float(np.mean([r["loss"] for r in rs[-args.window:]])) for name, rs in records.items()}
    per_step = {name: [r["loss"] for r in rs] for name, rs in records.items()}
    signal = final["bf16 seed 0"] - final["fp32 seed 0"]
    noise = final["fp32 seed 1"] - final["fp32 seed 0"]
    step_gap = float(np.max(np.abs(np.subtract(per_step["bf16 seed 0"], per_step["fp32 seed 0"]))))
    print(f"tiny recipe, {args.steps} steps, mean loss of the last {args.window}")
    for name, value in final.items():
        print(f"{name:<14}{value:>10.4f}")
    print(f"bf16 - fp32 (same seed): {signal:+.4f} ({signal / final['fp32 seed 0']:+.2%}); "
          f"fp32 seed 1 - seed 0 (noise): {noise:+.4f} ({noise / final['fp32 seed 0']:+.2%}); "
          f"largest per-step |bf16 - fp32|: {step_gap:.4f}")
    write_result(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "final_window_loss": final,
                            "bf16_minus_fp32": signal, "seed_noise": noise, "max_step_gap": step_gap,
                            "losses": per_step})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
