"""Build the rank's part of the model under the run's layout (TorchTitan's ``parallelize``): expert
parallelism (report 3.2.2), this rank's pipeline stages (3.2.1) and FP8 linears (3.3). The model's
math is untouched; what changes is which parameters a rank holds and how tokens reach the experts.
Nothing outside the rank's part is ever allocated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plugins.errors import ConfigError
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.init import materialize
from plugins.parallel.dualpipe import Layout, ScheduleError, check
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel
from plugins.parallel.pipeline_stages import PipelineShard
from plugins.parallel.replicas import stages_of
from plugins.precision.policy import convert_to_fp8, fp8_targets

from . import ds_internals
from .config import RunConfig
from .groups import ParallelGroups
from .schedules import BatchGrid


@dataclass
class Parallelized:
    """The rank's trainable module, and the pieces of the layout the trainer needs."""

    module: DeepSeekV3
    exchange: ExpertExchange | None
    shard: PipelineShard | None
    fp8_modules: list[str]
    expert_offset: int  # the global index of the rank's first routed expert


def check_fp8_policy(run: RunConfig) -> None:
    """An FP8 run whose ``parallel.fp8_modules`` match nothing is a config error, found on the meta device."""
    if run.parallel.fp8 == "none":
        return
    with torch.device("meta"):
        probe = DeepSeekV3(run.model)
    if not fp8_targets(probe, run.parallel.fp8_modules):
        raise ConfigError(f"{run.source}: parallel.fp8_modules: {run.parallel.fp8_modules} match no linear layer "
                          "of the model")


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


def check_schedule(run: RunConfig, pp: int, dp: int) -> BatchGrid:
    """The layout's grid of global batches, after checking every batch the ramp can produce
    (``BatchGrid.sizes``: a few dozen sizes, not one per step) against the pipeline schedule. The
    final batch must be on the grid as configured (the recipe's batch is not silently changed); a
    start below the schedule's smallest batch starts the ramp there (``ramp_note``)."""
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


def parallelize(run: RunConfig, groups: ParallelGroups, device: torch.device, init_from: str | None = None
                ) -> Parallelized:
    """Build only this rank's part of the model: on the ``meta`` device, keep the rank's experts and
    pipeline stages, then allocate them on ``device`` and initialise them as the whole model would
    be (``plugins.model.init``), or read them from ``init_from``; then FP8."""
    p = run.parallel
    with torch.device("meta"):
        model = DeepSeekV3(run.model)
    exchange = None
    if groups.ep > 1:
        exchange = ExpertExchange(groups.ep_group, run.model.n_routed_experts, groups.ep_backward_group,
                                  groups.ep_nodes)
        apply_expert_parallel(model, exchange)
    shard = None
    if groups.pp > 1:
        layout = Layout.placement(p.pipeline_schedule, groups.pp)
        shard = PipelineShard(model, stages_of(layout, groups.pipeline_rank), layout.stages)
    expert_offset = exchange.local_slice.start if exchange else 0
    dtype = torch.bfloat16 if device.type == "cuda" else None  # the bf16 engine's weights; FP32 masters are ZeRO's
    materialize(model, device, run.model.initializer_range, run.train.seed, expert_offset, dtype)
    if init_from:
        from .model_source import read_weights

        read_weights(init_from, model, expert_offset)
    fp8_modules = convert_to_fp8(model, p.fp8, p.fp8_modules, p.fp8_power_of_two_scales)
    if exchange is not None:
        ds_internals.mark_expert_parameters([param for moe in model.moe_layers() for param in moe.experts.parameters()],
                                            groups.expert_group_name)
    return Parallelized(model, exchange, shard, fp8_modules, expert_offset)
