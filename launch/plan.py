"""Does a layout fit? What each rank holds at its peak, FLOPs per token, and the recipe walked.

    python -m launch.plan CONFIG [--pp P] [--ep E] [--dp D] [--micro-batch M] [--seq-len L]
        [--pipeline-schedule dualpipe|dualpipev|1f1b] [--recompute none|selective|full] [--fp8 none|emulated|te|auto]
        [--device gpu|cpu] [--device-memory-gb 80] [--set section.key=value ...] [--json] [--walk]

The config is read by the same loader and ``--set`` overrides as pretraining; the flags name config
keys as ``launch/pretrain.py``'s do (``--dp`` is the launch's world / pp). The estimate is
``launch.plan_memory``'s; ``--walk`` steps through the whole token schedule
(``launch.walk``) and names the first step that cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys

from plugins.errors import ConfigError, run_cli
from plugins.model.flops import H800_BF16_PEAK, flops_per_token
from plugins.parallel.dualpipe import SCHEDULES
from plugins.precision.policy import FP8_BACKENDS

from .config import RECOMPUTE_MODES, RunConfig, check_world, load_run_config
from .plan_memory import Layout3D, Precision, plan_ranks
from .schedules import batch_size, check_schedule, ramp_note
from .walk import walk

# Resident memory of one CPU training process beyond what the planner counts (Python, torch, DeepSpeed,
# gloo, allocator slack), calibrated once: benchmarks/plan_vs_measured.py, the tiny recipe on one rank.
CPU_RUNTIME_OVERHEAD = 471 * 2**20
GB = 1e9


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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--walk", action="store_true", help="step through the whole token schedule")
    return parser.parse_args(argv)


def read_config(args: argparse.Namespace) -> RunConfig:
    flags = {"parallel.pp": args.pp, "parallel.ep": args.ep, "parallel.pipeline_schedule": args.pipeline_schedule,
             "parallel.fp8": args.fp8, "train.micro_batch_size": args.micro_batch, "data.seq_len": args.seq_len,
             "train.recompute": args.recompute}
    run = load_run_config(args.config, args.set + [f"{k}={v}" for k, v in flags.items() if v is not None])
    if args.dp < 1:
        raise ConfigError(f"--dp {args.dp}: expected a positive number of data-parallel ranks")
    if args.device_memory_gb <= 0:
        raise ConfigError(f"--device-memory-gb {args.device_memory_gb}: expected a positive size")
    check_world(run.parallel.pp, run.parallel.ep, run.parallel.pp * args.dp)
    return run


def estimate(run: RunConfig, dp: int, device: str, device_memory_gb: float) -> dict:
    """The planner's JSON object (see ``--json``)."""
    t, p = run.train, run.parallel
    grid = check_schedule(run, p.pp, dp)
    final = batch_size(t.batch, t.batch.ramp_tokens, grid)
    layout = Layout3D(p.pp, p.ep, dp, t.micro_batch_size, run.data.seq_len, p.pipeline_schedule,
                      final // (t.micro_batch_size * dp), t.recompute, device)
    ranks = plan_ranks(run.model, layout, Precision.of(device, t.optimizer_moments_dtype, p.fp8))
    flops = flops_per_token(run.model, run.data.seq_len)
    largest = max(ranks, key=lambda r: r["total_bytes"])
    return {
        "config": run.source, "device": device,
        "layout": {"pp": p.pp, "ep": p.ep, "dp": dp, "world": p.pp * dp, "micro_batch": t.micro_batch_size,
                   "seq_len": run.data.seq_len, "pipeline_schedule": p.pipeline_schedule if p.pp > 1 else None,
                   "micro_batches_per_step": layout.micro_batches, "recompute": t.recompute, "fp8": p.fp8,
                   "optimizer_moments_dtype": t.optimizer_moments_dtype},
        "ranks": ranks,
        "largest_rank": largest["pipeline_rank"],
        "largest_rank_total_bytes": largest["total_bytes"],
        "runtime_overhead_bytes": CPU_RUNTIME_OVERHEAD if device == "cpu" else 0,
        "ema_host_bytes_per_rank": largest["ema_host_bytes"],
        "flops_per_token": flops["total"], "flops": flops,
        "mfu_formula": f"MFU = {flops['total']:.4g} FLOPs/token x tokens/s / (world x peak FLOP/s; "
                       f"H800 BF16 {H800_BF16_PEAK:.4g})",
        "device_memory_bytes": device_memory_gb * GB,
        "fits": largest["total_bytes"] <= device_memory_gb * GB,
        "note": ramp_note(run, dp, grid),
    }


def table(plan: dict) -> str:
    L = plan["layout"]
    lines = [f"{plan['config']}: pp {L['pp']} x ep {L['ep']} x dp {L['dp']} = {L['world']} {plan['device'].upper()}s, "
             f"micro-batch {L['micro_batch']} x {L['seq_len']} tokens, {L['micro_batches_per_step']} micro-batches "
             f"per step, {L['pipeline_schedule'] or 'no pipeline'}, recompute {L['recompute']}, fp8 {L['fp8']}, "
             f"moments {L['optimizer_moments_dtype']}",
             f"{'rank':>4} {'params':>8} {'weights':>9} {'grads':>9} {'master':>9} {'moments':>9} "
             f"{'activations':>17} {'comm':>8} {'total':>9}"]
    for r in plan["ranks"]:
        lines.append(f"{r['pipeline_rank']:>4} {r['parameters'] / 1e9:>7.2f}B {r['parameters_bytes'] / GB:>7.1f}GB "
                     f"{r['gradients_bytes'] / GB:>7.1f}GB {r['master_weights_bytes'] / GB:>7.1f}GB "
                     f"{r['moments_bytes'] / GB:>7.1f}GB {r['activations_bytes'] / GB:>7.1f}GB ({r['activation_micro_batches']:>2} mb) "
                     f"{r['communication_bytes'] / GB:>6.1f}GB {r['total_bytes'] / GB:>7.1f}GB")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines += [f"largest rank {plan['largest_rank']}: {plan['largest_rank_total_bytes'] / GB:.1f} GB {verdict} in "
              f"{plan['device_memory_bytes'] / GB:.0f} GB; EMA in host memory {plan['ema_host_bytes_per_rank'] / GB:.1f} GB "
              "per rank",
              f"FLOPs per token {plan['flops_per_token']:.4g} (6 x {plan['flops']['parameters'] / 1e9:.2f}B "
              f"activated parameters + attention {plan['flops']['attention']:.3g}); {plan['mfu_formula']}"]
    if plan["runtime_overhead_bytes"]:
        lines.append(f"plus the process runtime, {plan['runtime_overhead_bytes'] / 2**20:.0f} MB on a CPU (not in the totals)")
    if plan["note"]:
        lines.append(f"note: {plan['note']}")
    return "\n".join(lines)


def walk_report(run: RunConfig, dp: int) -> tuple[str, bool]:
    """The walked recipe as text, and whether every step can run."""
    grid = check_schedule(run, run.parallel.pp, dp)
    stretches = walk(run, run.parallel.pp, dp, grid)
    lines = [f"{'steps':>17} {'tokens before':>15} {'batch':>6} {'micro':>5} {'lr phase':>8} {'lr':>21} "
             f"{'gamma':>6} {'lambda':>6}"]
    for s in stretches:
        lines.append(f"{s.first:>8}-{s.last:<8} {s.tokens_before:>15.4g} {s.batch:>6} {s.micro_batches:>5} "
                     f"{s.phase:>8} {s.lr_first:>9.3e}->{s.lr_last:<9.3e} {s.gamma:>6.3g} {s.lam:>6.3g}")
    bad = next((s for s in stretches if s.problem), None)
    last = stretches[-1]
    lines.append(f"first step that cannot run: step {bad.first} ({bad.problem})" if bad else
                 f"every step runs: {last.last} steps, {last.tokens_before + (last.last - last.first + 1) * last.batch * run.data.seq_len:.4g} tokens")
    note = ramp_note(run, dp, grid)
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines), bad is None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run = read_config(args)
        if args.walk:
            text, clean = walk_report(run, args.dp)
            print(text)
            return 0 if clean else 1
        plan = estimate(run, args.dp, args.device, args.device_memory_gb)
        print(json.dumps(plan) if args.json else table(plan))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
