"""The whole token schedule of a recipe under a layout, step by step without running a step (report
4.2): the global batch, micro-batches per pipeline, learning rate, gamma and lambda of every step,
compressed into runs of steps that share their batch, LR phase, gamma and lambda.

Every value comes from the functions the trainer calls (``launch.config.schedules``), at the steps and
token counts the trainer would reach. A run is found by bisection: every value is a monotone
function of (step, tokens), so equal values at both ends of a stretch mean equal values inside it,
and the ~235K steps of the 671B recipe take a few hundred evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config.run_config import LRSchedule, RunConfig
from launch.config.schedules import BatchGrid, batch_size, learning_rate, step_value
from plugins.parallel.dualpipe import ScheduleError, check


def lr_phase(schedule: LRSchedule, step: int, tokens: float) -> str:
    """The piece of the LR schedule a step is in (the LR itself changes every step in two of them)."""
    if step < schedule.warmup_steps:
        return "warm-up"
    past = tokens - schedule.constant_tokens
    if past < 0:
        return "constant"
    if past < schedule.cosine_tokens:
        return "cosine"
    return "hold" if past < schedule.cosine_tokens + schedule.hold_tokens else "final"


@dataclass
class Stretch:
    """Steps ``first``..``last`` (1-based, as the trainer logs them) sharing batch, phase, gamma, lambda."""

    first: int
    last: int
    tokens_before: int  # tokens trained before step ``first``
    batch: int
    micro_batches: int
    phase: str
    lr_first: float
    lr_last: float
    gamma: float
    lam: float
    problem: str | None  # why this batch cannot run under the pipeline schedule, or None


def walk(run: RunConfig, pp: int, dp: int, grid: BatchGrid) -> list[Stretch]:
    """Every step of ``run``'s recipe until ``train.total_tokens``, as stretches."""
    t, seq = run.train, run.data.seq_len
    micro = t.micro_batch_size

    def state(step: int, tokens: int) -> tuple:
        return (batch_size(t.batch, tokens, grid), lr_phase(t.lr, step, tokens),
                step_value(t.bias_update_speed, tokens), step_value(t.mtp_weight, tokens))

    out: list[Stretch] = []
    step, tokens = 0, 0  # optimizer steps done, tokens trained
    while tokens < t.total_tokens:
        key = state(step, tokens)
        batch = key[0]
        per_step = batch * seq
        remaining = -(-int(t.total_tokens - tokens) // per_step)  # steps to the end at this batch
        lo, hi = 1, remaining  # the stretch is the first n steps: state at step+n-1 equals key
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if state(step + mid - 1, tokens + (mid - 1) * per_step) == key:
                lo = mid
            else:
                hi = mid - 1
        n = lo
        problem = None
        if pp > 1:
            try:
                check(run.parallel.pipeline_schedule, pp, batch // (micro * dp))
            except ScheduleError as error:
                problem = str(error)
        out.append(Stretch(step + 1, step + n, tokens, batch, batch // (micro * dp), key[1],
                           learning_rate(t.lr, step, tokens),
                           learning_rate(t.lr, step + n - 1, tokens + (n - 1) * per_step), key[2], key[3], problem))
        step, tokens = step + n, tokens + n * per_step
    return out
