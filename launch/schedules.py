"""The report's token-based schedules (4.2 "Training Hyper-Parameters")."""

from __future__ import annotations

import math
from dataclasses import dataclass

from plugins.parallel.dualpipe import micro_batch_rule

from .config import BatchSchedule, LRSchedule, StepSchedule


def learning_rate(schedule: LRSchedule, step: int, tokens: float) -> float:
    """0 -> peak linearly over the warm-up steps; peak until ``constant_tokens``; cosine down to
    ``cosine_final`` over ``cosine_tokens``; ``cosine_final`` for ``hold_tokens``; then ``final``."""
    if step < schedule.warmup_steps:
        return schedule.peak * (step + 1) / schedule.warmup_steps
    past = tokens - schedule.constant_tokens
    if past < 0:
        return schedule.peak
    if past < schedule.cosine_tokens:
        progress = past / schedule.cosine_tokens
        return schedule.cosine_final + (schedule.peak - schedule.cosine_final) * 0.5 * (1 + math.cos(math.pi * progress))
    if past < schedule.cosine_tokens + schedule.hold_tokens:
        return schedule.cosine_final
    return schedule.final


@dataclass(frozen=True)
class BatchGrid:
    """The global batches (sequences) a layout can run: multiples of ``step``, at least ``minimum``.
    Without pipelining any multiple of micro-batch x data-parallel ranks; under a pipeline schedule
    the micro-batches per pipeline must also satisfy the schedule (``micro_batch_rule``: DualPipe an
    even count >= 2 x pp, DualPipeV >= 2 x pp, 1F1B >= pp)."""

    step: int = 1
    minimum: int = 1

    @classmethod
    def of(cls, micro_batch: int, dp: int, pp: int = 1, pipeline_schedule: str = "dualpipe") -> BatchGrid:
        multiple, minimum = micro_batch_rule(pipeline_schedule, pp) if pp > 1 else (1, 1)
        per_micro = micro_batch * dp
        return cls(step=multiple * per_micro, minimum=-(-minimum // multiple) * multiple * per_micro)

    def sizes(self, schedule: BatchSchedule) -> range:
        """Every global batch the ramp from ``start`` to ``final`` can produce, in order."""
        first = batch_size(schedule, 0.0, self)
        return range(first, max(first, batch_size(schedule, schedule.ramp_tokens, self)) + 1, self.step)


def batch_size(schedule: BatchSchedule, tokens: float, grid: BatchGrid | None = None) -> int:
    """Global batch (sequences) ramped linearly in tokens (report 4.2: 3072 -> 15360 over the first
    469B tokens), rounded down onto the layout's ``grid`` and never below its smallest batch. The one
    rounding the trainer and ``python -m launch.plan --walk`` both use."""
    fraction = min(1.0, tokens / schedule.ramp_tokens) if schedule.ramp_tokens > 0 else 1.0
    raw = schedule.start + (schedule.final - schedule.start) * fraction
    grid = grid or BatchGrid()
    return max(grid.minimum, int(raw // grid.step) * grid.step)


def step_value(schedule: StepSchedule, tokens: float) -> float:
    """gamma (bias update speed) and lambda (MTP weight) switch once at a token mark."""
    return schedule.value if tokens < schedule.until_tokens else schedule.then
