"""Does a layout fit? What each rank holds at its peak, FLOPs per token, and the recipe walked.

    python -m launch.plan CONFIG [--pp P] [--ep E] [--dp D] [--micro-batch M] [--seq-len L]
        [--pipeline-schedule dualpipe|dualpipev|1f1b] [--recompute none|selective|full] [--fp8 none|emulated|te|torch|auto]
        [--device gpu|cpu] [--device-memory-gb 80] [--set section.key=value ...] [--json] [--walk]
        [--hardware NAME|FILE [--global-batch N]] [--search --gpus N --hardware NAME|FILE]

The config is read by the same loader and ``--set`` overrides as pretraining; the flags name config
keys as ``launch/pretrain.py``'s do (``--dp`` is the launch's world / pp). The estimate is
``launch.planning.estimate``'s; ``--walk`` steps through the whole token schedule
(``launch.planning.walk``) and names the first step that cannot run. ``--hardware`` adds the
step-time model's answer (``launch.planning.step_time``: step seconds, tokens/s per GPU, MFU and the
breakdown) for a profile of ``configs/hardware/`` or a file ``python -m launch.calibrate`` wrote;
``--search`` ranks the layouts of ``--gpus`` devices that fit (``launch.planning.search``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from launch.config.run_config import RECOMPUTE_MODES, RunConfig, check_world, load_run_config
from launch.planning.estimate import estimate, table, walk_report, walked
from launch.planning.hardware import load_hardware
from launch.planning.search import search, search_table
from launch.planning.step_time import step_time, time_table
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
    parser.add_argument("--hardware", default=None, metavar="NAME|FILE",
                        help="predict the step time on a profile (configs/hardware/NAME.yaml) or a calibrated file")
    parser.add_argument("--global-batch", type=int, default=None, metavar="N",
                        help="sequences per step planned (default: the config's final batch)")
    parser.add_argument("--search", action="store_true",
                        help="rank the layouts of --gpus devices that fit by predicted step time (needs --hardware)")
    parser.add_argument("--gpus", type=int, default=None, help="devices to lay out under --search")
    parser.add_argument("--top", type=int, default=10, help="layouts --search prints (default 10)")
    return parser.parse_args(argv)


def read_config(args: argparse.Namespace) -> RunConfig:
    flags = {"parallel.pp": args.pp, "parallel.ep": args.ep, "parallel.pipeline_schedule": args.pipeline_schedule,
             "parallel.fp8": args.fp8, "train.micro_batch_size": args.micro_batch, "data.seq_len": args.seq_len,
             "train.recompute": args.recompute}
    if args.global_batch is not None:
        if args.global_batch < 1:
            raise ConfigError(f"--global-batch {args.global_batch}: expected a positive number of sequences")
        flags.update({"train.batch.start": args.global_batch, "train.batch.final": args.global_batch})
    run = load_run_config(args.config, args.set + [f"{k}={v}" for k, v in flags.items() if v is not None])
    if args.dp < 1:
        raise ConfigError(f"--dp {args.dp}: expected a positive number of data-parallel ranks")
    if not math.isfinite(args.device_memory_gb) or args.device_memory_gb <= 0:
        raise ConfigError(f"--device-memory-gb {args.device_memory_gb}: expected a positive size in GB")
    if not args.search:  # a search lays out --gpus itself
        check_world(run.parallel.pp, run.parallel.ep, run.parallel.pp * args.dp)
    return run


def check_flags(args: argparse.Namespace) -> None:
    """The flag combinations, before any work."""
    if args.search and args.hardware is None:
        raise ConfigError("--search: needs --hardware NAME|FILE to rank the layouts by")
    if args.search and (args.gpus is None or args.gpus < 1):
        raise ConfigError(f"--gpus {args.gpus}: --search needs a positive number of devices")
    if args.gpus is not None and not args.search:
        raise ConfigError("--gpus: only with --search (a single layout is --pp and --dp)")
    if args.search and args.walk:
        raise ConfigError("--search: not with --walk")
    if args.search and args.dp != 1:
        raise ConfigError(f"--dp {args.dp}: not with --search (the world is --gpus; dp = gpus / pp)")
    if args.top < 1:
        raise ConfigError(f"--top {args.top}: expected a positive number of layouts")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        check_flags(args)
        hardware = load_hardware(args.hardware) if args.hardware is not None else None
        run = read_config(args)
        if args.search:
            fixed = {"pp": args.pp, "ep": args.ep, "micro_batch": args.micro_batch,
                     "schedule": args.pipeline_schedule, "recompute": args.recompute}
            ranked = search(run, args.gpus, hardware, args.device, args.device_memory_gb, fixed,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
            print(json.dumps(ranked[:args.top]) if args.json else search_table(ranked, args.top, args.gpus, hardware))
            return 0 if ranked else 1
        if args.walk:
            answer = walked(run, args.dp)
            print(json.dumps(answer) if args.json else walk_report(answer))
            return 0 if answer["first_step_that_cannot_run"] is None else 1
        plan = estimate(run, args.dp, args.device, args.device_memory_gb)
        if hardware is not None:
            plan.update(step_time(run, plan, hardware))
        print(json.dumps(plan) if args.json else table(plan) + ("\n" + time_table(plan) if hardware else ""))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
