"""Flat pieces of global tensors through ``torch.distributed.checkpoint`` (DCP).

ZeRO-1 keeps each rank's share of the FP32 master weights and AdamW moments as contiguous ranges
of the parameters' flattened values, and expert parallelism gives each rank a contiguous range of
every expert bank: neither is a DTensor placement. Each such range is written and read here as
one chunk of a 1-D global tensor (the parameter flattened, every expert included) at its flat
offset; DCP records the chunks each rank wrote and, on load, reads every requested range from
the overlapping chunks, whatever layout wrote them. This is DCP's own resharding, driven by
custom planners (its documented extension point), as Megatron-Core does for its distributed
optimizer. Plain tensors and objects in the state dict take DCP's default path.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .digests import hashing_writer


@dataclass
class Piece:
    """``tensor`` (1-D, contiguous) holds elements ``offset .. offset + numel - 1`` of the
    flattened global tensor ``key`` of ``global_numel`` elements."""

    key: str
    global_numel: int
    offset: int
    tensor: torch.Tensor

    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([self.offset]), sizes=torch.Size([self.tensor.numel()]))


class PieceError(ValueError):
    """A requested piece the checkpoint cannot supply (missing key, other size)."""


class _SavePlanner(DefaultSavePlanner):
    def __init__(self, pieces: list[Piece]):
        super().__init__()
        self.pieces = {p.key: p for p in pieces}

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = [WriteItem(index=MetadataIndex(p.key, p.chunk().offsets), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(chunk=p.chunk(), properties=TensorProperties.create_from_tensor(
                               p.tensor), size=torch.Size([p.global_numel])))
                 for p in self.pieces.values()]
        self.plan = dataclasses.replace(plan, items=plan.items + items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        piece = self.pieces.get(index.fqn)
        return _own_storage(piece.tensor) if piece is not None else super().lookup_object(index)


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor whose storage is exactly its elements. DCP's writer clones a view
    into a larger storage (a ZeRO-1 partition) and keeps every written tensor until the rank's file
    is closed, so views would cost a copy of everything the rank writes; this costs nothing. (On a
    GPU the writer's host copies are kept the same way: a save needs host memory for the rank's
    share.)"""
    if view.untyped_storage().nbytes() == view.numel() * view.element_size():
        return view
    start = view.storage_offset() * view.element_size()
    storage = view.untyped_storage()[start:start + view.numel() * view.element_size()]
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(storage, 0, view.shape)


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self, pieces: list[Piece]):
        super().__init__(allow_partial_load=True)
        self.pieces = {p.key: p for p in pieces}

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        stored = self.metadata.state_dict_metadata
        items = [item for piece in self.pieces.values()
                 for item in create_read_items_for_chunk_list(piece.key, stored[piece.key], [piece.chunk()])]
        return dataclasses.replace(plan, items=plan.items + items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        piece = self.pieces.get(index.fqn)
        return piece.tensor if piece is not None else super().lookup_tensor(index)


def distributed() -> bool:
    """A process group is initialised (a save or load is collective)."""
    return dist.is_available() and dist.is_initialized()


def save(directory: Path, pieces: list[Piece], state: dict | None = None, group=None) -> dict[str, dict]:
    """Collective over ``group`` (default: the world) when distributed: every rank writes its pieces
    (and ``state``'s plain tensors, deduplicated across ranks) into ``directory``. Returns the size
    and checksum of each file this rank wrote, computed as it was written (``digests``). A write of
    this rank that failed raises its OSError (a full disk, a file-size limit); another rank's, DCP's
    ``CheckpointException``."""
    writer, files = hashing_writer(directory)
    try:
        with warnings.catch_warnings():  # without a process group DCP warns it assumes one process: it is one
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state or {}, storage_writer=writer, planner=_SavePlanner(pieces), process_group=group,
                     no_dist=not distributed())
    except dcp.CheckpointException:
        if files.failure is not None:
            raise files.failure from None
        raise
    return files.entries


def _mismatch(stored: dict[str, list[int]], pieces: list[Piece], state: dict) -> str | None:
    for piece in pieces:
        if piece.key not in stored:
            return f"holds no {piece.key}"
        if stored[piece.key] != [piece.global_numel]:
            return f"{piece.key} has {stored[piece.key][0]} elements, this model {piece.global_numel}"
    missing = sorted(set(state) - set(stored))
    return f"holds no {missing[0]}" if missing else None


def load(directory: Path, pieces: list[Piece], state: dict | None = None) -> None:
    """Fill ``pieces`` (and ``state``'s tensors) in place from ``directory``, reading only the
    stored chunks that overlap them. Collective over the world when distributed; a piece the
    checkpoint cannot supply on any rank raises ``PieceError`` on every rank before any reading."""
    state = state or {}
    problem = _mismatch(stored_keys(directory), pieces, state)
    if distributed():
        failed = torch.tensor([problem is not None], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and problem is None:
            problem = "does not fit this model (another rank's pieces are missing)"
    if problem is not None:
        raise PieceError(problem)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), planner=_LoadPlanner(pieces),
                 no_dist=not distributed())


def stored_keys(directory: Path) -> dict[str, list[int]]:
    """Every tensor key of a DCP directory with its global size (reads the metadata file only)."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return {key: list(value.size) for key, value in metadata.state_dict_metadata.items() if hasattr(value, "size")}
