"""Process groups, decided in one place: world = pp x dp, ranks laid out pipeline-major
(rank = stage * dp + dp_rank); expert parallelism lives inside the data-parallel group as
DeepSpeed lays it out: expert-parallel groups of ``ep`` consecutive ranks, and expert-data-parallel
groups of the ranks holding the same experts ([0, ep, 2ep, ...], [1, ep + 1, ...], ...)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from plugins.config import ConfigError

IMPLEMENTED_PP = {1}


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


def check_parallel_flags(pp: int, ep: int, num_experts: int) -> None:
    """Reject values the framework cannot run (yet) with a clear error instead of a silent fallback."""
    if pp not in IMPLEMENTED_PP:
        raise ConfigError(f"--pp {pp}: pipeline parallelism (DualPipe) is not implemented yet (supported: 1)")
    if ep < 1 or num_experts % ep:
        raise ConfigError(f"--ep {ep}: must be a positive divisor of model.n_routed_experts = {num_experts}")


def build_groups(pp: int, ep: int) -> ParallelGroups:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % pp:
        raise ConfigError(f"--pp {pp}: does not divide the {world} launched ranks (world = pp x dp)")
    dp = world // pp
    if dp % ep:
        raise ConfigError(f"--ep {ep}: does not divide the data-parallel size {dp} (the {world} launched ranks)")
    groups = ParallelGroups(rank=rank, world=world, pp=pp, dp=dp, ep=ep, dp_rank=rank % dp, dp_group=None)
    if ep > 1:
        from deepspeed.utils import groups as ds_groups

        # DeepSpeed's own expert groups: its expert-gradient all-reduce and ZeRO-1 partitions of the
        # expert parameters find them by this name.
        name = f"ep_size_{ep}"
        ds_groups._create_expert_and_data_parallel(ep)
        groups.ep_group = ds_groups._get_expert_parallel_group(name)
        groups.expert_dp_rank = ds_groups._get_expert_data_parallel_rank(name)
        groups.expert_group_name = name
    return groups
