"""Pre-train a DeepSeek-V3-style model on DeepSpeed (ZeRO-1 data parallel) with the report's recipe.

    deepspeed [--num_gpus N | --hostfile FILE] launch/pretrain.py --config configs/tiny.yaml \
        [--run-dir DIR] [--steps N] [--save-interval N] [--resume [auto] | --resume-from TAG | --init-from PATH] [--pp N] [--ep N] \
        [--pipeline-schedule dualpipe|dualpipev|1f1b] [--fp8 none|emulated|te|torch|auto] [--set section.key=value ...]

Without a launcher (``python launch/pretrain.py ...``) it runs as one process. ``--resume auto`` is the
command a scheduler requeues unchanged: it resumes when the run dir holds a checkpoint, else starts;
SIGTERM, SIGUSR1 or SIGINT on any rank, or the end of a rank's launcher, saves the step's checkpoint
and exits 0 (which process to signal: docs/training.md, long runs on clusters). The loop itself is
``launch.training.trainer.Trainer``; this file reads the command line into the config tree and starts
DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from launch.config.run_config import RunConfig, check_recompute, load_run_config
from launch.distributed import ds_internals
from launch.distributed.rendezvous import single_process_rendezvous
from launch.training.parallelize import check_fp8_policy
from launch.training.trainer import RunOptions, Trainer, TrainingStopped
from launch.training.watchdog import process_group_timeout
from plugins.errors import ConfigError, ProjectError
from plugins.parallel.dualpipe import SCHEDULES
from plugins.precision.policy import FP8_BACKENDS, resolve_backend
from plugins.precision.recipe import bound_cpu_gemm_cache


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/pretrain.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML with model:, data:, train: and parallel: sections")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name>")
    parser.add_argument("--steps", type=int, default=None, help="stop after this optimizer step (default: total_tokens)")
    parser.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--resume", nargs="?", const="strict", choices=("auto", "strict"), metavar="auto",
                        help="continue from the run dir's latest checkpoint (a damaged one falls back to the previous); "
                             "--resume auto: the same if the run dir holds a checkpoint, else start afresh (what a "
                             "requeued job runs)")
    parser.add_argument("--resume-from", default=None, metavar="TAG",
                        help="continue from this checkpoint of the run dir (e.g. step00000400); implies --resume")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help="start from these weights (a run dir, checkpoint dir or HF dir) with a fresh optimizer "
                             "and schedules: the long-context stages")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel ranks, world = pp x dp (parallel.pp)")
    parser.add_argument("--pipeline-schedule", default=None, choices=SCHEDULES,
                        help="with --pp > 1: DualPipe (report 3.2.1), DualPipeV or 1F1B (parallel.pipeline_schedule)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (parallel.ep)")
    parser.add_argument("--fp8", default=None, choices=FP8_BACKENDS,
                        help="FP8 linears (report 3.3): emulated block-scaled GEMMs, Transformer-Engine, PyTorch's "
                             "block-wise scaled_mm (SM90), or auto (parallel.fp8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. train.lr.peak=1e-3")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def read_config(args: argparse.Namespace) -> RunConfig:
    """The config file, ``--set`` overrides, then the flags (which name config keys too)."""
    flags = {"parallel.pp": args.pp, "parallel.ep": args.ep, "parallel.pipeline_schedule": args.pipeline_schedule,
             "parallel.fp8": args.fp8, "train.save_interval": args.save_interval}
    overrides = args.set + [f"{key}={value}" for key, value in flags.items() if value is not None]
    run = load_run_config(args.config, overrides)
    run.parallel.fp8 = resolve_backend(run.parallel.fp8)
    check_fp8_policy(run)
    check_recompute(run)  # again: --fp8 auto may have become te
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: expected a positive number of optimizer steps")
    path = run_dir(args)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--run-dir {path}: {'it' if existing == path else existing} exists and is not a directory")
    return run


def run_dir(args: argparse.Namespace) -> Path:
    return args.run_dir or Path("runs") / Path(args.config).stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = read_config(args)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import deepspeed

    if single_process_rendezvous():
        print("no launcher: running as one process (`deepspeed --num_gpus N launch/pretrain.py ...` runs N ranks)",
              flush=True)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(args.local_rank)
    else:
        bound_cpu_gemm_cache()
    device = torch.device("cuda", args.local_rank) if on_gpu else torch.device("cpu")
    timeout = process_group_timeout(run.train.hang_timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **({"timeout": timeout} if timeout else {}))
    ds_internals.release_shared_memory_names()
    options = RunOptions(run_dir=run_dir(args), steps=args.steps,
                         resume="strict" if args.resume_from is not None else args.resume, resume_from=args.resume_from,
                         init_from=args.init_from)
    try:
        trainer = Trainer(run, options, device)
        stopped_by = trainer.train()
        if stopped_by and trainer.rank0:
            print(f"saved step {trainer.step} on {stopped_by}; rerun the same command with --resume auto", flush=True)
        return 0
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
