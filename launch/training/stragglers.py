"""The one small collective at the end of every step: each rank's busy time and whether it received
a preemption signal, in one all-reduce of a [world, 2] table.

A rank's busy time is the step's wall time minus what it spent blocked on other ranks (the phases
marked ``plugins.progress.waiting``: the expert all-to-alls, pipeline receives and sends,
DeepSpeed's gradient reduction, the trainer's all-reduces), measured on the host. Every rank leaves
a collective together, so plain step times are alike; the busy times tell the rank that keeps the
others waiting (the slowest) from the one that waits most (the fastest).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plugins.progress import waiting


def step_end(busy_seconds: float, signal: int, device: torch.device) -> tuple[dict[str, float], int]:
    """(``rank_step_seconds_max``, ``rank_step_seconds_min``, ``slowest_rank``), and the signal any
    rank received (0: none). Collective."""
    table = torch.zeros(dist.get_world_size(), 2, dtype=torch.float64)
    table[dist.get_rank()] = torch.tensor([busy_seconds, float(signal)], dtype=torch.float64)
    table = table.to(device)
    with waiting("end-of-step all-reduce"):
        dist.all_reduce(table)
    rows = table.tolist()  # the one host read
    seconds = [row[0] for row in rows]
    slowest = max(range(len(seconds)), key=seconds.__getitem__)
    return ({"rank_step_seconds_max": seconds[slowest], "rank_step_seconds_min": min(seconds),
             "slowest_rank": slowest}, int(max(row[1] for row in rows)))
