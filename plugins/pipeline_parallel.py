"""Process groups and replica bookkeeping for pipeline parallelism.

A model piece held by several pipeline ranks (every stage under DualPipe, the embedding under
1F1B with MTP) is one parameter trained from all of them: ``ReplicaSync`` sums the replicas'
gradients once per step, before the data-parallel reduction, and marks all copies but the first
``ds_pipe_replicated`` so DeepSpeed's global gradient norm counts each parameter once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .dualpipe import Layout
from .pipeline_stages import PipelineShard, stage_pieces


def piece_of(name: str) -> str:
    """The piece (``embed``, ``layer.I``, ``head``) a full-model parameter name belongs to."""
    top = name.split(".")[0]
    if top == "embed_tokens":
        return "embed"
    if top == "layers":
        return f"layer.{name.split('.')[1]}"
    return "head"


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


def channel_groups(chunks: int) -> dict[tuple[str, int], dist.ProcessGroup]:
    """One world-wide group per (activation | gradient, sending chunk); called on every rank."""
    return {(kind, chunk): dist.new_group(list(range(dist.get_world_size())))
            for kind in ("act", "grad") for chunk in range(chunks)}


class ReplicaSync:
    """``rank``: this pipeline rank; global rank of pipeline rank p in replica d is p * dp + d."""

    def __init__(self, layout: Layout, shard: PipelineShard, rank: int, dp: int, dp_rank: int):
        owners = holders(layout, shard.config)
        shared_sets = sorted({ranks for ranks in owners.values() if len(ranks) > 1})
        mine: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for replica in range(dp):  # every rank creates every group, in the same order
            for ranks in shared_sets:
                group = dist.new_group([p * dp + replica for p in ranks])
                if replica == dp_rank and rank in ranks:
                    mine[ranks] = group
        self.buckets: list[tuple[dist.ProcessGroup, list[torch.nn.Parameter]]] = []
        by_set: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
        for name, param in shard.named_parameters():
            ranks = owners[piece_of(name)]
            param.ds_pipe_replicated = rank != ranks[0]
            if len(ranks) > 1:
                by_set.setdefault(ranks, []).append(param)
        self.buckets = [(mine[ranks], params) for ranks, params in sorted(by_set.items())]

    def sum_gradients(self) -> None:
        for group, params in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for param, summed in zip(params, _unflatten_dense_tensors(flat, grads)):
                param.grad = summed
