"""Measure this machine into a hardware profile for ``launch.plan --hardware FILE``: the op fixed
cost, GEMM and grouped-GEMM rates at the model's shapes, SDPA, memory-bound kernels, host copies on
a GPU, and collectives between local ranks (``launch.planning.calibration``). A few minutes at most.

    python -m launch.calibrate --output hw.yaml [--config configs/tiny.yaml] [--ranks 2] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from launch.config.run_config import load_run_config
from launch.planning.calibration import calibrate
from launch.planning.hardware import load_hardware
from plugins.atomic import write_text_atomic
from plugins.errors import ConfigError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="the profile to write (YAML)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="the model whose shapes are measured")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks the collectives run between (default 2)")
    parser.add_argument("--device", default="gpu" if torch.cuda.is_available() else "cpu", choices=["cpu", "gpu"],
                        help="measure the GPU (NCCL) or the CPU (gloo); default: a GPU when there is one")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.ranks < 2:
            raise ConfigError(f"--ranks {args.ranks}: expected at least 2 ranks for the collectives")
        if args.device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("--device gpu: no CUDA device here (use --device cpu)")
        if args.device == "gpu" and torch.cuda.device_count() < args.ranks:
            raise ConfigError(f"--ranks {args.ranks}: only {torch.cuda.device_count()} GPUs here")
        if args.output.is_dir():
            raise ConfigError(f"--output {args.output}: is a directory; expected a YAML file path")
        run = load_run_config(args.config)
        started = time.perf_counter()

        def progress(line: str) -> None:
            print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

        device = torch.device("cuda", 0) if args.device == "gpu" else torch.device("cpu")
        profile, _ = calibrate(run.model, run.data.seq_len, args.ranks, device, progress)
        header = (f"# Measured by python -m launch.calibrate --config {args.config} --ranks {args.ranks} on "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} in {time.perf_counter() - started:.0f} s; every figure measured.\n")
        write_text_atomic(args.output, header + yaml.safe_dump(profile, sort_keys=False))
        load_hardware(str(args.output))  # what was written reads back as a profile
        print(f"wrote {args.output}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
