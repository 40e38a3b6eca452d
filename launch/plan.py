"""Does a layout fit? What each rank holds at its peak, FLOPs per token, and the recipe walked.

    python -m launch.plan CONFIG [--pp P] [--ep E] [--dp D] [--micro-batch M] [--seq-len L]
        [--pipeline-schedule dualpipe|dualpipev|1f1b] [--recompute none|selective|full] [--fp8 none|emulated|te|torch|auto]
        [--device gpu|cpu] [--device-memory-gb 80] [--set section.key=value ...] [--json] [--walk]

The config is read by the same loader and ``--set`` overrides as pretraining; the flags name config
keys as ``launch/pretrain.py``'s do (``--dp`` is the launch's world / pp). The estimate is
``launch.planning.estimate``'s; ``--walk`` steps through the whole token schedule
(``launch.planning.walk``) and names the first step that cannot run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from launch.config.run_config import RECOMPUTE_MODES, RunConfig, check_world, load_run_config
from launch.planning.estimate import estimate, table, walk_report, walked
from plugins.errors import ConfigError, run_cli
from plugins.parallel.dualpipe import SCHEDULES
from plugins.precision.policy import FP8_BACKENDS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML with model:, data:, train: and parallel: sections")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel ranks (parallel.pp)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (parallel.ep)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel ranks: world = pp x dp (default 1)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (train.micro_batch_size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (data.seq_len)")
    parser.add_argument("--pipeline-schedule", default=None, choices=SCHEDULES, help="parallel.pipeline_schedule")
    parser.add_argument("--recompute", default=None, choices=RECOMPUTE_MODES, help="train.recompute")
    parser.add_argument("--fp8", default=None, choices=FP8_BACKENDS, help="parallel.fp8 (FP8 caches linear inputs)")
    parser.add_argument("--device", default="gpu", choices=["gpu", "cpu"],
                        help="bf16 weights and FP32 masters (gpu) or fp32 throughout (cpu), as the trainer runs")
    parser.add_argument("--device-memory-gb", type=float, default=80.0, help="memory of one device (default 80)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with --walk: the walked recipe)")
    parser.add_argument("--walk", action="store_true", help="step through the whole token schedule")
    return parser.parse_args(argv)


def read_config(args: argparse.Namespace) -> RunConfig:
    flags = {"parallel.pp": args.pp, "parallel.ep": args.ep, "parallel.pipeline_schedule": args.pipeline_schedule,
             "parallel.fp8": args.fp8, "train.micro_batch_size": args.micro_batch, "data.seq_len": args.seq_len,
             "train.recompute": args.recompute}
    run = load_run_config(args.config, args.set + [f"{k}={v}" for k, v in flags.items() if v is not None])
    if args.dp < 1:
        raise ConfigError(f"--dp {args.dp}: expected a positive number of data-parallel ranks")
    if not math.isfinite(args.device_memory_gb) or args.device_memory_gb <= 0:
        raise ConfigError(f"--device-memory-gb {args.device_memory_gb}: expected a positive size in GB")
    check_world(run.parallel.pp, run.parallel.ep, run.parallel.pp * args.dp)
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run = read_config(args)
        if args.walk:
            answer = walked(run, args.dp)
            print(json.dumps(answer) if args.json else walk_report(answer))
            return 0 if answer["first_step_that_cannot_run"] is None else 1
        plan = estimate(run, args.dp, args.device, args.device_memory_gb)
        print(json.dumps(plan) if args.json else table(plan))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
