"""Sharded checkpoints in ``RUN_DIR/checkpoints/stepNNNNNNNN``: each rank writes only what it holds,
and any layout reads them back (report 3.2: PP x EP x ZeRO-1 data parallelism).

    .metadata, __R_0.distcp   ``torch.distributed.checkpoint`` (``dcp_pieces``): for every
                              parameter NAME of the whole model, ``model/NAME`` (FP32 master
                              weights), ``exp_avg/NAME`` and ``exp_avg_sq/NAME`` (AdamW moments,
                              stored in the dtype they train in: FP32, or BF16 under
                              ``train.optimizer_moments_dtype: bfloat16``; a resume with the
                              other dtype converts them on load, BF16 -> FP32 exactly, FP32 ->
                              BF16 rounded to nearest), each a flattened global tensor (every routed expert included) of
                              which each rank wrote its ZeRO-1 partition of the stages and experts
                              it holds; ``ema/NAME`` the same for the host-memory EMA of the
                              weights when the run keeps one; ``buffers/NAME`` (router biases)
    train_state.json          step, tokens, the data sampler's global position, Adam's step, the
                              layout that wrote it
    rng_rankN.pt              rank N's RNG states (restored when resumed on as many ranks)
    files.json                every other file's size, written last: a checkpoint is verified
                              against it before any reading (a truncated or missing file is named)

No rank gathers the model: a save writes views into the optimizer's own partitions, a load reads
only the stored chunks overlapping this rank's partitions, so a checkpoint written at one
(pp, ep, dp) resumes at another directly. A save is written under ``.stepNNNNNNNN.partial`` and
renamed once every rank has finished; then the ``latest`` pointer moves (write + rename), so a
run killed while saving resumes from the previous complete checkpoint. A resume whose latest
checkpoint is damaged (or whose pointer names a deleted directory) says so and falls back to the
newest earlier checkpoint that verifies; ``--resume-from TAG`` picks one. ``keep`` > 0 prunes all
but the newest ``keep`` checkpoints.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.distributed import ds_internals
from plugins.atomic import torch_save_atomic, write_text_atomic
from plugins.errors import ProjectError
from plugins.model.experts import RoutedExperts

from . import dcp_pieces
from .dcp_pieces import Piece, PieceError

LATEST = "latest"
TRAIN_STATE = "train_state.json"
MANIFEST = "files.json"


class CheckpointError(ProjectError):
    """A checkpoint that is missing, incomplete or does not fit the model; one line naming it."""


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def is_checkpoint(directory: Path) -> bool:
    """A directory that was saved as a checkpoint (whether its files are intact: ``verify``)."""
    return (directory / MANIFEST).is_file()


def _write_manifest(directory: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_text_atomic(directory / MANIFEST, json.dumps(sizes, indent=1))


def verify(directory: Path) -> None:
    """Every file the checkpoint was saved with, at its saved size; else one line naming the file."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    try:
        sizes = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{directory}: not a complete checkpoint ({MANIFEST} missing or unreadable)") from None
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint is damaged)")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, saved with {size} (the checkpoint is damaged)")


def read_train_state(directory: Path) -> dict:
    verify(directory)
    return json.loads((directory / TRAIN_STATE).read_text())


def expert_banks(model: torch.nn.Module) -> set[str]:
    """Names of the routed-expert banks ([E, ...] tensors, sliced by expert parallelism)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, RoutedExperts)
            for name, _ in module.named_parameters(recurse=False)}


class Placement:
    """Where a rank's (possibly expert-sliced) parameter lies in the flattened global tensor."""

    def __init__(self, model: torch.nn.Module, num_experts: int, expert_offset: int):
        self.banks, self.num_experts, self.expert_offset = expert_banks(model), num_experts, expert_offset

    def __call__(self, name: str, param: torch.Tensor) -> tuple[int, int]:
        """(global element count, flat offset of the rank's parameter in it)."""
        if name not in self.banks:
            return param.numel(), 0
        per_expert = param.numel() // param.shape[0]
        return self.num_experts * per_expert, self.expert_offset * per_expert


def buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers (router biases) as checkpoint keys, the tensors themselves (loaded in
    place). Transformer-Engine's ``_extra_state`` (FP8 scaling history) is not kept."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}  # a tied head too
    return {f"buffers/{name}": value for name, value in model.state_dict(keep_vars=True).items()
            if name not in params and not name.endswith("_extra_state")}


def read_model(directory: Path, model: torch.nn.Module, num_experts: int, expert_offset: int = 0,
               weights: str = "model") -> None:
    """Fill ``model`` (the whole model, or the stages and experts one rank holds) with a checkpoint's
    FP32 weights (``weights="ema"``: their EMA) and router biases, reading only what it holds.
    Collective when distributed."""
    where = Placement(model, num_experts, expert_offset)
    pieces = [Piece(f"{weights}/{name}", *where(name, param), param.data.view(-1))
              for name, param in model.named_parameters()]
    try:
        dcp_pieces.load(directory, pieces, buffers(model))
    except PieceError as error:
        hint = " (the run kept no EMA: train.ema)" if weights == "ema" else ""
        raise CheckpointError(f"{directory}: {error}{hint}") from None


def holds_ema(directory: Path) -> bool:
    return any(key.startswith("ema/") for key in dcp_pieces.stored_keys(directory))


class Checkpointer:
    """``expert_offset``: the global index of this rank's first routed expert; ``keep``: how many
    checkpoints to retain (0: all)."""

    def __init__(self, run_dir: Path, rank: int = 0, world_size: int = 1, num_experts: int = 0,
                 expert_offset: int = 0, keep: int = 0, layout: dict | None = None):
        self.directory = Path(run_dir) / "checkpoints"
        self.rank, self.world_size = rank, world_size
        self.num_experts, self.expert_offset, self.keep = num_experts, expert_offset, keep
        self.layout = layout or {}

    def latest_tag(self) -> str | None:
        pointer = self.directory / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def choose(self, tag: str | None = None) -> tuple[str, list[str]]:
        """The checkpoint to resume: ``tag`` (it must verify), else the newest checkpoint not after
        ``latest`` that verifies. Returns it and one line per damaged checkpoint passed over."""
        if tag is not None:
            verify(self.directory / tag)
            return tag, []
        latest = self.latest_tag()
        if latest is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        candidates = sorted({p.name for p in self.directory.glob("step*") if p.is_dir() and p.name <= latest} | {latest},
                            reverse=True)
        skipped = []
        for candidate in candidates:
            try:
                verify(self.directory / candidate)
                return candidate, skipped
            except CheckpointError as error:
                skipped.append(str(error))
        raise CheckpointError(f"{self.directory}: no checkpoint verifies ({skipped[0]})")

    def _pieces(self, engine, saving: bool, ema: dict[str, torch.Tensor] | None = None) -> list[Piece]:
        """This rank's ZeRO-1 partitions (and their EMA) as pieces of the global tensors; on save, a
        stage replica another pipeline rank also holds is left to that rank."""
        where = Placement(engine.module, self.num_experts, self.expert_offset)
        pieces = []
        for name, param, start, states in ds_internals.zero_fragments(engine):
            if saving and ds_internals.is_pipe_replicated(param):
                continue
            total, base = where(name, param)
            states = {**states, **({"ema": ema[name]} if ema is not None else {})}
            pieces += [Piece(f"{key}/{name}", total, base + start, tensor) for key, tensor in states.items()]
        return pieces

    def save(self, engine, step: int, client_state: dict, ema: dict[str, torch.Tensor] | None = None) -> str:
        tag = f"step{step:08d}"
        final, partial = self.directory / tag, self.directory / f".{tag}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        dcp_pieces.save(partial, self._pieces(engine, saving=True, ema=ema), buffers(engine.module))
        torch_save_atomic(_rng_state(), partial / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            state = {**client_state, "adam_step": ds_internals.adam_step(engine), "world_size": self.world_size,
                     "layout": self.layout}
            write_text_atomic(partial / TRAIN_STATE, json.dumps(state, indent=1))
        dist.barrier()
        if self.rank == 0:
            _write_manifest(partial)
            shutil.rmtree(final, ignore_errors=True)  # a complete save of this step the pointer never named
            partial.rename(final)
            write_text_atomic(self.directory / LATEST, tag)
            self._prune(tag)
        dist.barrier()
        return tag

    def _prune(self, latest: str) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir() and p.name != latest)
        for tag in tags[: max(0, len(tags) - (self.keep - 1))]:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    def load(self, engine, tag: str, ema: dict[str, torch.Tensor] | None = None) -> dict:
        """Restore checkpoint ``tag`` (see ``choose``) into the engine (and ``ema``'s tensors when the
        checkpoint holds an EMA), whatever layout wrote it; returns its train state, with
        ``ema_restored``."""
        directory = self.directory / tag
        state = read_train_state(directory)
        state["ema_restored"] = ema is not None and holds_ema(directory)
        try:
            dcp_pieces.load(directory, self._pieces(engine, saving=False, ema=ema if state["ema_restored"] else None),
                            buffers(engine.module))
        except PieceError as error:
            raise CheckpointError(f"{directory}: {error}") from None
        ds_internals.copy_master_weights_to_model(engine)
        ds_internals.set_adam_step(engine, state["adam_step"])
        rng = directory / f"rng_rank{self.rank}.pt"
        if state["world_size"] == self.world_size and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return state
