"""Every process group of a run, built in one place and in the same order on every rank.

World = pp x dp, ranks pipeline-major (rank = pipeline_rank * dp + dp_rank) as DeepSpeed's
``PipeDataParallelTopology``, whose grid is the engine's ``mpu`` under pipelining (data-parallel
groups per pipeline rank, gradient norms summed over the pipeline). Expert parallelism lives
inside the data-parallel group as DeepSpeed lays it out: expert-parallel groups of ``ep``
consecutive ranks, expert-data-parallel groups of the ranks holding the same experts. Under
pipelining: the same expert ranks again for backward exchanges (so a micro-batch's backward
all-to-all can run beside another's forward one), one world group per (activation | gradient,
chunk) for point-to-point, and one group per set of pipeline ranks sharing a replicated piece.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from launch.config.run_config import check_world
from plugins.model.config import ModelConfig
from plugins.parallel.dualpipe import Layout
from plugins.parallel.replicas import replica_sets

from . import ds_internals


@dataclass
class ParallelGroups:
    rank: int
    pp: int
    dp: int
    ep: int
    dp_rank: int
    dp_group: dist.ProcessGroup | None = None  # this pipeline rank's data-parallel ranks (None: the world, pp 1)
    ep_group: dist.ProcessGroup | None = None  # this rank's expert-parallel group (ep > 1)
    expert_dp_rank: int = 0  # position among the ranks that hold the same experts
    expert_group_name: str | None = None  # DeepSpeed's name for the ep / expert-dp groups
    ep_backward_group: dist.ProcessGroup | None = None  # the same ranks again, for backward exchanges (pp > 1)
    ep_nodes: list[int] | None = None  # the node of each rank of this rank's expert-parallel group
    mpu: object | None = None  # DeepSpeed's PipelineParallelGrid (pp > 1)
    channels: dict = field(default_factory=dict)  # ("act" | "grad", chunk) -> group (pp > 1)
    replicas: dict = field(default_factory=dict)  # pipeline-rank set -> group of this replica (pp > 1)

    @property
    def pipeline_rank(self) -> int:
        return self.rank // self.dp

    @property
    def pipeline_peers(self) -> list[int]:
        """Global rank of each pipeline rank of this data-parallel replica."""
        return [p * self.dp + self.dp_rank for p in range(self.pp)]


def build_groups(pp: int, ep: int, schedule: str, config: ModelConfig, timeout: timedelta | None = None
                 ) -> ParallelGroups:
    """``timeout``: of the groups built here (DeepSpeed's expert groups keep the backend's default)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = check_world(pp, ep, world)
    groups = ParallelGroups(rank=rank, pp=pp, dp=dp, ep=ep, dp_rank=rank % dp)
    if pp > 1:
        groups.mpu = ds_internals.pipeline_grid(pp, dp)
        groups.dp_group = groups.mpu.get_data_parallel_group()
    if ep > 1:
        groups.ep_group, groups.expert_dp_rank, groups.expert_group_name = ds_internals.expert_groups(ep, groups.mpu)
        per_node = int(os.environ.get("LOCAL_SIZE", world))  # set by DeepSpeed's launcher: ranks per node
        groups.ep_nodes = [r // per_node for r in dist.get_process_group_ranks(groups.ep_group)]
        if pp > 1:
            for start in range(0, world, ep):
                backward = dist.new_group(list(range(start, start + ep)), timeout=timeout)
                if start <= rank < start + ep:
                    groups.ep_backward_group = backward
    if pp > 1:
        groups.channels, groups.replicas = pipeline_groups(schedule, pp, dp, config, timeout)
    return groups


def pipeline_groups(schedule: str, pp: int, dp: int, config: ModelConfig, timeout: timedelta | None = None
                    ) -> tuple[dict, dict]:
    """The point-to-point channels, one world group per (activation | gradient, chunk), and this
    rank's replica groups (pipeline-rank set -> group of this data-parallel replica's ranks).
    Collective: every rank calls it, in the same order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout.placement(schedule, pp)
    channels = {(kind, chunk): dist.new_group(list(range(world)), timeout=timeout)
                for kind in ("act", "grad") for chunk in range(layout.chunks)}
    replicas = {}
    for replica in range(dp):
        for ranks in replica_sets(layout, config):
            group = dist.new_group([p * dp + replica for p in ranks], timeout=timeout)
            if replica == rank % dp and rank // dp in ranks:
                replicas[ranks] = group
    return channels, replicas
