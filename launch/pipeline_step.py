"""One optimizer step's forward and backward under pipeline parallelism (``--pp N``): this rank's
stages of the model, the schedule for the step's number of micro-batches, the replicas'
gradient sum. DeepSpeed then reduces over the data-parallel group, clips by the global norm
over all stages and steps, as without pipelining."""

from __future__ import annotations

import torch

from plugins.config import ConfigError
from plugins.dualpipe import Layout, ScheduleError, check
from plugins.model import DeepSeekV3
from plugins.pipeline_parallel import ReplicaSync, channel_groups, stages_of
from plugins.pipeline_runtime import PipelineRuntime
from plugins.pipeline_stages import PipelineShard

from launch.groups import ParallelGroups


def check_schedule(schedule: str, groups: ParallelGroups, batch_sizes: list[int], micro_batch_size: int,
                   source: str) -> None:
    """Every global batch of the ramp must give the schedule enough micro-batches."""
    for size in batch_sizes:
        try:
            check(schedule, groups.pp, size // (micro_batch_size * groups.dp))
        except ScheduleError as error:
            raise ConfigError(f"{source}: train.batch = {size} sequences = {size // (micro_batch_size * groups.dp)} "
                              f"micro-batches per pipeline at --pp {groups.pp}: {error}") from None


class PipelineStep:
    def __init__(self, model: DeepSeekV3, groups: ParallelGroups, schedule: str, micro_batches: int):
        self.groups, self.schedule = groups, schedule
        layout = check(schedule, groups.pp, micro_batches)
        self.shard = PipelineShard(model, stages_of(layout, groups.pipeline_rank), layout.stages)
        self.peers = [p * groups.dp + groups.dp_rank for p in range(groups.pp)]
        self.channels = channel_groups(layout.chunks)
        self.replicas = ReplicaSync(layout, self.shard, groups.pipeline_rank, groups.dp, groups.dp_rank)
        self.runtimes: dict[int, PipelineRuntime] = {}

    def _runtime(self, micro_batches: int) -> PipelineRuntime:
        if micro_batches not in self.runtimes:  # the batch-size ramp changes the count
            layout: Layout = check(self.schedule, self.groups.pp, micro_batches)
            self.runtimes[micro_batches] = PipelineRuntime(layout, self.groups.pipeline_rank, self.shard, self.peers,
                                                           self.channels)
        return self.runtimes[micro_batches]

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], mtp_weight: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the mean loss over ``batches`` in ``.grad`` (replicas summed); returns this
        rank's (loss, lm, mtp, balance) sums and expert loads, to be summed over all ranks."""
        totals = self._runtime(len(batches)).step(batches, mtp_weight)
        self.replicas.sum_gradients()
        lm, mtp, aux = totals.values
        return torch.stack([lm + mtp + aux, lm, mtp, aux]), totals.loads
