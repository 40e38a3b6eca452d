"""The fastest layouts of N devices that fit (``launch.plan --search``): every pp x dp = N with ep
dividing dp (and the routed experts), each pipeline schedule, recompute mode, micro-batch size and
the FFN offload on or off, planned by the memory planner (``estimate``), those that fit timed by the
step-time model (``step_time``) and ranked by step seconds. A layout the config validation or a
schedule refuses (too few blocks for the stages, a batch the schedule cannot split) is skipped.
"""

from __future__ import annotations

import dataclasses

from launch.config.run_config import RECOMPUTE_MODES, RunConfig, check_recompute, check_world
from plugins.errors import ProjectError
from plugins.parallel.dualpipe import SCHEDULES

from .estimate import GB, estimate
from .hardware import Hardware
from .step_time import step_time

MICRO_BATCHES = (1, 2, 4)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(run: RunConfig, gpus: int, device: str):
    """(run with the layout's keys set, dp) for every layout of ``gpus`` devices to try."""
    c = run.model
    for pp in divisors(gpus):
        if pp > c.num_hidden_layers:
            continue
        dp = gpus // pp
        for ep in (e for e in divisors(dp) if c.n_routed_experts % e == 0):
            for schedule in (SCHEDULES if pp > 1 else (run.parallel.pipeline_schedule,)):
                for recompute in RECOMPUTE_MODES:
                    for micro in MICRO_BATCHES:
                        for offload in ((False, True) if device == "gpu" else (False,)):
                            memory = dataclasses.replace(run.train.memory, offload_ffn=offload)
                            train = dataclasses.replace(run.train, micro_batch_size=micro, recompute=recompute,
                                                        memory=memory)
                            parallel = dataclasses.replace(run.parallel, pp=pp, ep=ep, pipeline_schedule=schedule)
                            yield dataclasses.replace(run, train=train, parallel=parallel), dp


def search(run: RunConfig, gpus: int, hw: Hardware, device: str, device_memory_gb: float,
           global_batch: int | None = None) -> list[dict]:
    """Every candidate that fits, fastest first: its layout, largest-rank memory and timing."""
    found = []
    for candidate, dp in candidates(run, gpus, device):
        try:
            check_world(candidate.parallel.pp, candidate.parallel.ep, gpus)
            check_recompute(candidate)
            plan = estimate(candidate, dp, device, device_memory_gb)
        except ProjectError:
            continue
        if not plan["fits"]:
            continue
        timing = step_time(candidate, plan, hw)
        found.append({"layout": {**plan["layout"], "offload_ffn": candidate.train.memory.offload_ffn},
                      "largest_rank_total_bytes": plan["largest_rank_total_bytes"], "fits": True, **timing})
    if global_batch is not None:
        found = [f for f in found if f["tokens_per_step"] == global_batch * run.data.seq_len]
    return sorted(found, key=lambda f: f["step_seconds"])


def search_table(ranked: list[dict], top: int, gpus: int, hw: Hardware) -> str:
    if not ranked:
        return f"no layout of {gpus} devices fits"
    lines = [f"the {min(top, len(ranked))} fastest of {len(ranked)} layouts of {gpus} devices that fit, on {hw.name}:",
             f"{'pp':>3} {'ep':>4} {'dp':>5} {'schedule':>9} {'recompute':>9} {'mb':>3} {'offload':>7} {'memory':>8} "
             f"{'step s':>8} {'tok/s/GPU':>9} {'MFU':>6} {'compute':>8} {'comm':>8} {'bubble':>8} {'optim':>7} {'offl':>7}"]
    for r in ranked[:top]:
        L, b = r["layout"], r["breakdown"]
        lines.append(f"{L['pp']:>3} {L['ep']:>4} {L['dp']:>5} {L['pipeline_schedule'] or '-':>9} {L['recompute']:>9} "
                     f"{L['micro_batch']:>3} {'on' if L['offload_ffn'] else 'off':>7} "
                     f"{r['largest_rank_total_bytes'] / GB:>6.1f}GB {r['step_seconds']:>8.3g} "
                     f"{r['tokens_per_second_per_gpu']:>9.4g} {100 * r['mfu']:>5.1f}% {b['compute']:>8.3g} "
                     f"{b['exposed_communication']:>8.3g} {b['bubble']:>8.3g} {b['optimizer']:>7.3g} {b['offload']:>7.3g}")
    return "\n".join(lines)
