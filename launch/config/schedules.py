"""The report's token-based schedules (4.2 "Training Hyper-Parameters"), and the global batches a
layout can run them at."""

from __future__ import annotations

import math
from dataclasses import dataclass

from plugins.errors import ConfigError
from plugins.parallel.dualpipe import ScheduleError, check, micro_batch_rule

from .run_config import BatchSchedule, LRSchedule, RunConfig, StepSchedule


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


def _fix_hint(schedule: str, pp: int, dp: int, batch: int, micro: int, key: str) -> str:
    """What would make a batch run under the schedule: a micro-batch size, or a larger batch."""
    for candidate in range(micro - 1, 0, -1):
        if batch % (candidate * dp) == 0:
            try:
                check(schedule, pp, batch // (candidate * dp))
                return f"--set train.micro_batch_size={candidate}"
            except ScheduleError:
                continue
    need = (pp if schedule == "1f1b" else 2 * pp) * micro * dp
    return f"global batches of at least {need} sequences (--set {key}={need})"


def check_batch_multiple(run: RunConfig, dp: int) -> None:
    """The ramp's ends are whole micro-batches on every data-parallel rank: one line naming the key,
    with the nearest batch that is."""
    t = run.train
    granularity = t.micro_batch_size * dp
    for name in ("start", "final"):
        value = getattr(t.batch, name)
        if value % granularity:
            raise ConfigError(f"{run.source}: train.batch.{name}: {value} sequences is not a multiple of "
                              f"micro_batch_size x data-parallel ranks = {t.micro_batch_size} x {dp}; fix: "
                              f"--set train.batch.{name}={max(granularity, value // granularity * granularity)}")


def check_schedule(run: RunConfig, pp: int, dp: int) -> BatchGrid:
    """The layout's grid of global batches, after checking the ramp's ends (``check_batch_multiple``)
    and every batch the ramp can produce (``BatchGrid.sizes``: a few dozen sizes, not one per step)
    against the pipeline schedule; the trainer and ``launch.plan`` both call it. The final batch must
    be on the grid as configured (the recipe's batch is not silently changed); a start below the
    schedule's smallest batch starts the ramp there (``ramp_note``)."""
    check_batch_multiple(run, dp)
    schedule, micro, final = run.parallel.pipeline_schedule, run.train.micro_batch_size, run.train.batch.final
    grid = BatchGrid.of(micro, dp, pp, schedule)
    sizes = [final] if final % grid.step or final < grid.minimum else list(grid.sizes(run.train.batch))
    for size in sizes:
        count = size // (micro * dp)
        try:
            if pp > 1:
                check(schedule, pp, count)
        except ScheduleError as error:
            raise ConfigError(f"{run.source}: train.batch.final = {size} sequences = {count} micro-batches of "
                              f"{micro} per pipeline at --pp {pp}: {error}; fix: "
                              f"{_fix_hint(schedule, pp, dp, size, micro, 'train.batch.final')}") from None
    return grid


def ramp_note(run: RunConfig, dp: int, grid: BatchGrid) -> str | None:
    """What a user should know when the schedule raises the ramp's first batches (report 4.2's 3072
    sequences are 24 micro-batches at dp 128, DualPipe at pp 16 needs 32)."""
    start, t, p = run.train.batch.start, run.train, run.parallel
    if start >= grid.minimum:
        return None
    return (f"train.batch.start = {start} sequences is below {grid.minimum}, the smallest global batch "
            f"{p.pipeline_schedule} runs at --pp {p.pp} ({grid.minimum // (t.micro_batch_size * dp)} micro-batches "
            f"of {t.micro_batch_size} x {dp} data-parallel ranks): the ramp holds {grid.minimum} until it passes it")
