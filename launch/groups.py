"""Process groups, decided in one place: world = pp x dp, ranks laid out pipeline-major
(rank = stage * dp + dp_rank); expert parallelism lives inside the data-parallel group."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from plugins.config import ConfigError

IMPLEMENTED = {"pp": {1}, "ep": {1}}
NOT_YET = {
    "pp": "pipeline parallelism (DualPipe) is not implemented yet",
    "ep": "expert parallelism is not implemented yet",
}


@dataclass
class ParallelGroups:
    rank: int
    world: int
    pp: int
    dp: int
    ep: int
    dp_rank: int
    dp_group: dist.ProcessGroup | None  # None: the default (world) group


def check_parallel_flags(pp: int, ep: int) -> None:
    """Reject values the framework cannot run yet with a clear error instead of a silent fallback."""
    for flag, value in (("pp", pp), ("ep", ep)):
        if value not in IMPLEMENTED[flag]:
            allowed = ", ".join(map(str, sorted(IMPLEMENTED[flag])))
            raise ConfigError(f"--{flag} {value}: {NOT_YET[flag]} (supported: {allowed})")


def build_groups(pp: int, ep: int) -> ParallelGroups:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % pp:
        raise ConfigError(f"--pp {pp}: does not divide the {world} launched ranks (world = pp x dp)")
    dp = world // pp
    if dp % ep:
        raise ConfigError(f"--ep {ep}: does not divide the data-parallel size {dp}")
    return ParallelGroups(rank=rank, world=world, pp=pp, dp=dp, ep=ep, dp_rank=rank % dp, dp_group=None)
