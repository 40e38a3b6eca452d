"""The fastest layouts of N devices that fit (``launch.plan --search``): every pp x dp = N with ep
dividing dp (and the routed experts), each pipeline schedule, recompute mode, micro-batch size and
the FFN offload on or off — an axis given on the command line (``--pp``, ``--ep``, ``--micro-batch``,
``--pipeline-schedule``, ``--recompute``) is held at that value — planned by the memory planner
(``estimate``), those that fit timed by the step-time model (``step_time``) and ranked by step
seconds. A layout the config validation or a schedule refuses (too few blocks for the stages, a
batch the schedule cannot split) is skipped, and so is one whose weights and gradients alone
(a lower bound from the parameter counts) exceed the device, before the planner builds it.
"""

from __future__ import annotations

import dataclasses

from launch.config.run_config import RECOMPUTE_MODES, RunConfig, check_recompute, check_world
from plugins.errors import ProjectError
from plugins.model.param_count import count_parameters
from plugins.parallel.dualpipe import SCHEDULES

from .estimate import GB, estimate
from .hardware import Hardware
from .step_time import step_time

MICRO_BATCHES = (1, 2, 4)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def weights_lower_bound(run: RunConfig, pp: int, ep: int, schedule: str, device: str) -> float:
    """Bytes of weights and gradients a rank holds at least: its share of the non-expert and of the
    routed-expert parameters (two stages a rank under DualPipe), two bytes each on a GPU, four on a CPU."""
    c = run.model
    experts = (c.num_moe_layers + c.num_nextn_predict_layers) * c.n_routed_experts * 3 * c.hidden_size * \
        c.moe_intermediate_size
    total = count_parameters(c)["total"] + count_parameters(c)["mtp"]
    stages = 2 if pp > 1 and schedule == "dualpipe" else 1
    return stages * ((total - experts) / pp + experts / (pp * ep)) * 2 * (2 if device == "gpu" else 4)


def candidates(run: RunConfig, gpus: int, device: str, fixed: dict):
    """(run with the layout's keys set, dp) for every layout of ``gpus`` devices to try; ``fixed``:
    the axes held (``pp``, ``ep``, ``micro_batch``, ``schedule``, ``recompute``; None: enumerated)."""
    c = run.model

    def axis(name, values):
        return (fixed[name],) if fixed.get(name) is not None else values

    for pp in axis("pp", [p for p in divisors(gpus) if p <= c.num_hidden_layers]):
        dp = gpus // pp
        for ep in axis("ep", [e for e in divisors(dp) if c.n_routed_experts % e == 0]):
            for schedule in (axis("schedule", SCHEDULES) if pp > 1 else (run.parallel.pipeline_schedule,)):
                for recompute in axis("recompute", RECOMPUTE_MODES):
                    for micro in axis("micro_batch", MICRO_BATCHES):
                        for offload in ((False, True) if device == "gpu" else (False,)):
                            memory = dataclasses.replace(run.train.memory, offload_ffn=offload)
                            train = dataclasses.replace(run.train, micro_batch_size=micro, recompute=recompute,
                                                        memory=memory)
                            parallel = dataclasses.replace(run.parallel, pp=pp, ep=ep, pipeline_schedule=schedule)
                            yield dataclasses.replace(run, train=train, parallel=parallel), dp


def search(run: RunConfig, gpus: int, hw: Hardware, device: str, device_memory_gb: float,
           fixed: dict | None = None, progress=None) -> list[dict]:
    """Every candidate that fits, fastest first: its layout, largest-rank memory and timing."""
    found = []
    tried = 0
    for candidate, dp in candidates(run, gpus, device, fixed or {}):
        p = candidate.parallel
        if weights_lower_bound(candidate, p.pp, p.ep, p.pipeline_schedule, device) > device_memory_gb * GB:
            continue
        tried += 1
        if progress is not None and tried % 10 == 0:
            progress(f"{tried} layouts planned, {len(found)} fit")
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
    if progress is not None:
        progress(f"{tried} layouts planned, {len(found)} fit")
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
