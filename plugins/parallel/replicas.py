"""Replica bookkeeping for pipeline parallelism.

A model piece held by several pipeline ranks (every stage under DualPipe, the embedding under
1F1B with MTP) is one parameter trained from all of them: ``ReplicaSync`` sums the replicas'
gradients once per step, before the data-parallel reduction; ``secondary`` lists the copies held
by any but the first of their ranks, which the gradient norm must count once. The
process groups come from the launcher's one group builder (``launch.distributed.groups``), one per set of
pipeline ranks that ``replica_sets`` lists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _take_tensors, _unflatten_dense_tensors

from .dualpipe import Layout
from .pipeline_stages import piece_of, stage_pieces

BUCKET = 64 << 20  # bytes per all-reduce of replica gradients (of one dtype)


def stages_of(layout: Layout, rank: int) -> list[int]:
    return sorted({layout.stage(rank, c) for c in range(layout.chunks)})


def holders(layout: Layout, config) -> dict[str, tuple[int, ...]]:
    """piece -> the pipeline ranks holding it."""
    held: dict[str, set[int]] = {}
    for rank in range(layout.ranks):
        for stage in stages_of(layout, rank):
            for piece in stage_pieces(config, stage, layout.stages):
                held.setdefault(piece, set()).add(rank)
    return {piece: tuple(sorted(ranks)) for piece, ranks in held.items()}


def replica_sets(layout: Layout, config) -> list[tuple[int, ...]]:
    """The sets of pipeline ranks that hold a piece together (each needs a process group)."""
    return sorted({ranks for ranks in holders(layout, config).values() if len(ranks) > 1})


class ReplicaSync:
    """``rank``: this pipeline rank; ``groups``: replica set -> the group of this data-parallel
    replica's ranks of that set (only the sets this rank belongs to); ``grad_attribute``: where a
    parameter's gradient of the step is: ``grad``, or the FP32 ``grad_accum`` the engine keeps under
    ``train.precision: bf16`` (report 3.3: the replicas' sum in FP32 too)."""

    def __init__(self, layout: Layout, model: torch.nn.Module, rank: int,
                 groups: dict[tuple[int, ...], dist.ProcessGroup], grad_attribute: str = "grad"):
        owners = holders(layout, model.config)
        by_set: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
        self.secondary: list[torch.nn.Parameter] = []
        for name, param in model.named_parameters():
            ranks = owners[piece_of(name)]
            if rank != ranks[0]:
                self.secondary.append(param)
            if len(ranks) > 1:
                by_set.setdefault(ranks, []).append(param)
        self.buckets = [(groups[ranks], params) for ranks, params in sorted(by_set.items())]
        self.grad_attribute = grad_attribute
        self.grad_dtype = None if grad_attribute == "grad" else torch.float32

    def sum_gradients(self) -> None:
        """All-reduce the replicas' gradients in place, ``BUCKET`` bytes at a time, so the step
        never holds a second copy of the replicated gradients (under DualPipe: all of them)."""
        name = self.grad_attribute
        for group, params in self.buckets:
            for param in params:
                if getattr(param, name, None) is None:
                    setattr(param, name, torch.zeros_like(param, dtype=self.grad_dtype))
            for grads in _take_tensors([getattr(p, name) for p in params], BUCKET):
                if len(grads) == 1 and grads[0].is_contiguous():
                    dist.all_reduce(grads[0], group=group)
                    continue
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=group)
                for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    grad.copy_(summed)
