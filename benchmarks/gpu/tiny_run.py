"""Step 2 of ``run_all.sh``: the tiny recipe through the ``deepspeed`` launcher in BF16
(``train.precision: bf16``) for 50 steps, then a resume for 10 more; losses, tokens/s and peak memory
from its ``metrics.jsonl`` (``results/tiny_run.json``, written after each of the two runs). The dry run:
2 steps and a resume to 3 on CPU.

    python benchmarks/gpu/tiny_run.py [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device import ROOT, skip, write

from launch.config.run_config import TrainConfig


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(run_dir: Path, steps: int, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    launcher = [shutil.which("deepspeed")] if shutil.which("deepspeed") else [sys.executable, "-m",
                                                                              "deepspeed.launcher.runner"]
    command = [*launcher, "--num_gpus", "1", "--master_port", str(_port()), "launch/pretrain.py",
               "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", str(steps),
               "--save-interval", str(steps), "--set", "train.precision=bf16", "--set", "train.wandb_mode=disabled",
               *extra]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}")
    return result, time.perf_counter() - started


def summary(run_dir: Path, seconds: float) -> dict:
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"steps": [records[0]["step"], records[-1]["step"]], "loss_first": records[0]["loss"],
            "loss_last": records[-1]["loss"], "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in records),
            "peak_memory_mb": records[-1]["peak_memory_mb"], "wall_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if "precision" not in TrainConfig.__dataclass_fields__:
        skip("tiny recipe in BF16", "train.precision is not a config key on this branch (launch/config/run_config.py)")
        return 0
    steps, more = (2, 1) if args.dry_run else (50, 10)
    with tempfile.TemporaryDirectory() as directory:
        run_dir = Path(directory) / "tiny"
        result = {}
        _, seconds = pretrain(run_dir, steps)
        result["run"] = summary(run_dir, seconds)
        print(f"tiny bf16: {steps} steps, loss {result['run']['loss_first']:.3f} -> {result['run']['loss_last']:.3f}, "
              f"{result['run']['tokens_per_s_median']:.0f} tokens/s, {seconds:.0f} s", flush=True)
        write("tiny_run", args.dry_run, result)
        _, seconds = pretrain(run_dir, steps + more, "--resume")
        result["resumed"] = summary(run_dir, seconds)
        if result["resumed"]["steps"][-1] != steps + more:
            raise SystemExit(f"the resume ended at step {result['resumed']['steps'][-1]}, not {steps + more}")
        print(f"resumed to step {steps + more}: loss {result['resumed']['loss_last']:.3f}, {seconds:.0f} s", flush=True)
        write("tiny_run", args.dry_run, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
