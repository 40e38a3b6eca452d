"""The planner's answer for one config and layout: what each rank holds at its peak
(``rank_memory``), FLOPs per token and MFU's formula, whether the largest rank fits the device, as
JSON-ready data or a table; and the whole token schedule walked (``walk``), as data or text."""

from __future__ import annotations

import dataclasses

from launch.config.run_config import RunConfig
from launch.config.schedules import batch_size, check_schedule, ramp_note
from plugins.model.flops import H800_BF16_PEAK, flops_per_token
from plugins.precision.recipe import resolve_precision

from .rank_memory import Layout3D, Precision, plan_ranks
from .walk import walk

# Resident memory of one CPU training process beyond what the planner counts (Python, torch, DeepSpeed,
# gloo, allocator slack), calibrated once: benchmarks/plan_vs_measured.py, the tiny recipe on one rank.
CPU_RUNTIME_OVERHEAD = 471 * 2**20
# What a BF16 run adds to it on a CPU (oneDNN's BF16 GEMM primitives and their scratchpads, bounded by
# plugins.precision.recipe.bound_cpu_gemm_cache), calibrated the same way under train.precision bf16.
CPU_BF16_RUNTIME_EXTRA = 224 * 2**20
GB = 1e9


def estimate(run: RunConfig, dp: int, device: str, device_memory_gb: float) -> dict:
    """The planner's JSON object (see ``--json``)."""
    t, p = run.train, run.parallel
    grid = check_schedule(run, p.pp, dp)
    final = batch_size(t.batch, t.batch.ramp_tokens, grid)
    layout = Layout3D(p.pp, p.ep, dp, t.micro_batch_size, run.data.seq_len, p.pipeline_schedule,
                      final // (t.micro_batch_size * dp), t.recompute, device)
    precision = resolve_precision(t.precision, device == "gpu")
    ranks = plan_ranks(run.model, layout, Precision.of(device, t.optimizer_moments_dtype, p.fp8, p.fp8_modules,
                                                            precision), t.memory)
    flops = flops_per_token(run.model, run.data.seq_len)
    largest = max(ranks, key=lambda r: r["total_bytes"])
    return {
        "config": run.source, "device": device,
        "layout": {"pp": p.pp, "ep": p.ep, "dp": dp, "world": p.pp * dp, "micro_batch": t.micro_batch_size,
                   "seq_len": run.data.seq_len, "pipeline_schedule": p.pipeline_schedule if p.pp > 1 else None,
                   "micro_batches_per_step": layout.micro_batches, "recompute": t.recompute, "fp8": p.fp8,
                   "optimizer_moments_dtype": t.optimizer_moments_dtype,
                   "precision": precision},
        "ranks": ranks,
        "largest_rank": largest["pipeline_rank"],
        "largest_rank_total_bytes": largest["total_bytes"],
        "runtime_overhead_bytes": (CPU_RUNTIME_OVERHEAD + (CPU_BF16_RUNTIME_EXTRA if precision == "bf16" else 0)
                                   if device == "cpu" else 0),
        "ema_host_bytes_per_rank": largest["ema_host_bytes"],
        # train.async_save: the host copy a checkpoint is written from (of the EMA too, when kept)
        "save_staging_host_bytes_per_rank": (largest["save_staging_host_bytes"] +
                                             (largest["ema_host_bytes"] if t.ema is not None else 0)
                                             if t.async_save else 0),
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
             f"{'rank':>4} {'params':>8} {'weights':>9} {'fp8 copy':>9} {'grads':>9} {'master':>9} {'moments':>9} "
             f"{'activations':>17} {'comm':>8} {'total':>9}"]
    for r in plan["ranks"]:
        lines.append(f"{r['pipeline_rank']:>4} {r['parameters'] / 1e9:>7.2f}B {r['parameters_bytes'] / GB:>7.1f}GB "
                     f"{r['fp8_weights_bytes'] / GB:>7.1f}GB {r['gradients_bytes'] / GB:>7.1f}GB {r['master_weights_bytes'] / GB:>7.1f}GB "
                     f"{r['moments_bytes'] / GB:>7.1f}GB {r['activations_bytes'] / GB:>7.1f}GB ({r['activation_micro_batches']:>2} mb) "
                     f"{r['communication_bytes'] / GB:>6.1f}GB {r['total_bytes'] / GB:>7.1f}GB")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines += [f"largest rank {plan['largest_rank']}: {plan['largest_rank_total_bytes'] / GB:.1f} GB {verdict} in "
              f"{plan['device_memory_bytes'] / GB:.0f} GB; EMA in host memory {plan['ema_host_bytes_per_rank'] / GB:.1f} GB "
              "per rank" + (f", the asynchronous saves' staging copy {plan['save_staging_host_bytes_per_rank'] / GB:.1f} "
                            "GB more" if plan["save_staging_host_bytes_per_rank"] else ""),
              f"FLOPs per token {plan['flops_per_token']:.4g} (6 x {plan['flops']['parameters'] / 1e9:.2f}B "
              f"activated parameters + attention {plan['flops']['attention']:.3g}); {plan['mfu_formula']}"]
    offload = max(plan["ranks"], key=lambda r: r["offload_host_bytes"])
    if offload["offload_host_bytes"]:
        lines.append(f"train.memory.offload_ffn: up to {offload['offload_host_bytes'] / GB:.1f} GB of pinned host memory "
                     f"per rank (rank {offload['pipeline_rank']}), {offload['offload_bytes_per_step'] / GB:.0f} GB "
                     "per step copied each way over the GPU's host link")
    if plan["runtime_overhead_bytes"]:
        lines.append(f"plus the process runtime, {plan['runtime_overhead_bytes'] / 2**20:.0f} MB on a CPU (not in the totals)")
    if plan["note"]:
        lines.append(f"note: {plan['note']}")
    return "\n".join(lines)


def walked(run: RunConfig, dp: int) -> dict:
    """The walked recipe as JSON-ready data (``--walk --json``): its stretches of steps, the first
    step that cannot run (or None) and the steps and tokens of the whole schedule."""
    grid = check_schedule(run, run.parallel.pp, dp)
    stretches = walk(run, run.parallel.pp, dp, grid)
    bad = next((s for s in stretches if s.problem), None)
    last = stretches[-1]
    return {"config": run.source, "stretches": [dataclasses.asdict(s) for s in stretches],
            "first_step_that_cannot_run": None if bad is None else {"step": bad.first, "problem": bad.problem},
            "steps": last.last, "tokens": last.tokens_before + (last.last - last.first + 1) * last.batch * run.data.seq_len,
            "note": ramp_note(run, dp, grid)}


def walk_report(answer: dict) -> str:
    """``walked``'s answer as text."""
    lines = [f"{'steps':>17} {'tokens before':>15} {'batch':>6} {'micro':>5} {'lr phase':>8} {'lr':>21} "
             f"{'gamma':>6} {'lambda':>6}"]
    for s in answer["stretches"]:
        lines.append(f"{s['first']:>8}-{s['last']:<8} {s['tokens_before']:>15.4g} {s['batch']:>6} "
                     f"{s['micro_batches']:>5} {s['phase']:>8} {s['lr_first']:>9.3e}->{s['lr_last']:<9.3e} "
                     f"{s['gamma']:>6.3g} {s['lam']:>6.3g}")
    bad = answer["first_step_that_cannot_run"]
    lines.append(f"first step that cannot run: step {bad['step']} ({bad['problem']})" if bad else
                 f"every step runs: {answer['steps']} steps, {answer['tokens']:.4g} tokens")
    if answer["note"]:
        lines.append(f"note: {answer['note']}")
    return "\n".join(lines)
