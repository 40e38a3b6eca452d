"""Process groups, decided in one place: world = pp x dp, ranks laid out pipeline-major
(rank = pipeline_rank * dp + dp_rank) as DeepSpeed's ``PipeDataParallelTopology``, whose grid is
the engine's ``mpu`` under pipelining (data-parallel groups per pipeline rank, gradient norms
summed over the pipeline). Expert parallelism lives inside the data-parallel group as DeepSpeed
lays it out: expert-parallel groups of ``ep`` consecutive ranks, and expert-data-parallel groups
of the ranks holding the same experts ([0, ep, 2ep, ...], [1, ep + 1, ...], ... per pipeline rank)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from plugins.config import ConfigError

@dataclass
class ParallelGroups:
    rank: int
    world: int
    pp: int
    dp: int
    ep: int
    dp_rank: int
    dp_group: dist.ProcessGroup | None  # None: the default (world) group
    ep_group: dist.ProcessGroup | None = None  # this rank's expert-parallel group (ep > 1)
    expert_dp_rank: int = 0  # position among the ranks that hold the same experts
    expert_group_name: str | None = None  # DeepSpeed's name for the ep / expert-dp groups
    ep_backward_group: dist.ProcessGroup | None = None  # the same ranks again, for backward exchanges (pp > 1)
    pipeline_rank: int = 0
    mpu: object | None = None  # DeepSpeed's PipelineParallelGrid (pp > 1)


def check_parallel_flags(pp: int, ep: int, num_experts: int, schedule: str = "dualpipe") -> None:
    """Reject values the framework cannot run with a clear error instead of a silent fallback."""
    if pp < 1:
        raise ConfigError(f"--pp {pp}: must be a positive number of pipeline ranks")
    if schedule == "dualpipe" and pp > 1 and pp % 2:
        raise ConfigError(f"--pp {pp}: DualPipe needs an even number of pipeline ranks "
                          "(each rank holds stage i and stage pp-1-i); use --pipeline-schedule dualpipev or 1f1b")
    if ep < 1 or num_experts % ep:
        raise ConfigError(f"--ep {ep}: must be a positive divisor of model.n_routed_experts = {num_experts}")


def build_groups(pp: int, ep: int) -> ParallelGroups:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % pp:
        raise ConfigError(f"--pp {pp}: does not divide the {world} launched ranks (world = pp x dp)")
    dp = world // pp
    if dp % ep:
        raise ConfigError(f"--ep {ep}: does not divide the data-parallel size {dp} (the {world} launched ranks)")
    groups = ParallelGroups(rank=rank, world=world, pp=pp, dp=dp, ep=ep, dp_rank=rank % dp, dp_group=None,
                            pipeline_rank=rank // dp)
    from deepspeed.utils import groups as ds_groups

    if pp > 1:
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipelineParallelGrid

        groups.mpu = ds_groups.mpu = PipelineParallelGrid(topology=PipeDataParallelTopology(num_pp=pp, num_dp=dp))
        groups.dp_group = groups.mpu.get_data_parallel_group()
    if ep > 1:
        # DeepSpeed's own expert groups: its expert-gradient all-reduce and ZeRO-1 partitions of the
        # expert parameters find them by this name.
        name = f"ep_size_{ep}"
        if pp > 1:
            ds_groups._create_expert_data_and_model_parallel(ep, mpu=groups.mpu)
            for start in range(0, world, ep):  # every rank creates every group, in the same order
                backward = dist.new_group(list(range(start, start + ep)))
                if start <= rank < start + ep:
                    groups.ep_backward_group = backward
        else:
            ds_groups._create_expert_and_data_parallel(ep)
        groups.ep_group = ds_groups._get_expert_parallel_group(name)
        groups.expert_dp_rank = ds_groups._get_expert_data_parallel_rank(name)
        groups.expert_group_name = name
    return groups
