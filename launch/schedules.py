"""The report's token-based schedules (4.2 "Training Hyper-Parameters")."""

from __future__ import annotations

import math

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


def batch_size(schedule: BatchSchedule, tokens: float, granularity: int = 1) -> int:
    """Global batch (sequences) ramped linearly in tokens, rounded down to a multiple of
    ``granularity`` (data-parallel ranks x micro-batch), never below one multiple."""
    fraction = min(1.0, tokens / schedule.ramp_tokens) if schedule.ramp_tokens > 0 else 1.0
    raw = schedule.start + (schedule.final - schedule.start) * fraction
    return max(granularity, int(raw // granularity) * granularity)


def step_value(schedule: StepSchedule, tokens: float) -> float:
    """gamma (bias update speed) and lambda (MTP weight) switch once at a token mark."""
    return schedule.value if tokens < schedule.until_tokens else schedule.then
