"""Checkpoints in ``RUN_DIR/checkpoints/stepNNNNNNNN``, independent of how the run was laid out:
every parameter with its FP32 master value and AdamW moments, assembled from DeepSpeed's ZeRO-1
partitions (``deepspeed.utils.safe_get_full_*``), so a run saved with one expert-parallel size
resumes with another (experts are re-sliced on load) and ``launch.convert`` reads the whole model.

    dense.pt                  non-expert parameters, buffers (router biases), Adam's step, client state
    experts_SSSSS-EEEEE.pt    the routed experts SSSSS..EEEEE-1 of every MoE block (one file per
                              expert-parallel rank; a single file without expert parallelism)
    rng_rankN.pt              each rank's RNG states

With pipeline parallelism every pipeline rank writes its own stages (``dense_ppNNN.pt``,
``experts_SSSSS-EEEEE_ppNNN.pt``); a parameter held by several pipeline ranks (DualPipe's stage
replicas) is written once, by the first. Readers merge the files by parameter name.

A checkpoint is complete only once the ``latest`` pointer names it. The pointer is replaced
atomically (write + rename) after every rank has finished writing, so a run killed while saving
resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from plugins.atomic import torch_save_atomic, write_text_atomic
from plugins.errors import ProjectError
from plugins.model.experts import RoutedExperts

from . import ds_internals

LATEST = "latest"
MOMENTS = ("exp_avg", "exp_avg_sq")
EXPERT_FILE = re.compile(r"experts_(\d+)-(\d+)(?:_pp\d+)?\.pt")
DENSE_FILE = re.compile(r"dense(?:_pp\d+)?\.pt")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class CheckpointError(ProjectError):
    """A checkpoint that is missing or incomplete; one line naming the directory or file."""


def expert_parameter_names(model: torch.nn.Module) -> set[str]:
    """The routed-expert banks ([E, ...] tensors, sliced by expert parallelism)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, RoutedExperts)
            for name, _ in module.named_parameters(recurse=False)}


def is_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(DENSE_FILE.fullmatch(p.name) for p in directory.iterdir())


def read_dense(directory: Path) -> dict:
    """``dense.pt``, or the pipeline ranks' ``dense_ppNNN.pt`` merged: params, buffers, adam_step, client."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    files = sorted(p for p in directory.iterdir() if DENSE_FILE.fullmatch(p.name))
    if not files:
        raise CheckpointError(f"{directory}: no dense.pt (not a complete checkpoint)")
    merged = {"params": {}, "buffers": {}}
    for path in files:
        stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        merged["params"].update(stored["params"])
        merged["buffers"].update(stored["buffers"])
        merged["adam_step"], merged["client"] = stored["adam_step"], stored["client"]
    return merged


def read_experts(directory: Path, names: set[str], start: int, stop: int) -> dict[str, dict[str, torch.Tensor]]:
    """Rows ``start..stop-1`` of every expert bank in ``names``, from whichever expert files hold them."""
    files = sorted((int(m[1]), int(m[2]), directory / m[0])
                   for m in (EXPERT_FILE.fullmatch(p.name) for p in directory.iterdir()) if m)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in names}
    for first, last, path in files:
        if last <= start or first >= stop:
            continue
        stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        rows = slice(max(start, first) - first, min(stop, last) - first)
        for name in names & stored.keys():
            for key, value in stored[name].items():
                pieces[name].setdefault(key, []).append(value[rows])
    for name, states in pieces.items():
        held = sum(part.shape[0] for part in states.get("value", []))
        if held != stop - start:
            raise CheckpointError(f"{directory}: the expert files hold {held} of experts {start}..{stop - 1} of {name}")
    return {name: {key: torch.cat(parts) for key, parts in states.items()} for name, states in pieces.items()}


class Checkpointer:
    """``expert_slice``: the global experts this rank holds; ``expert_writer``: whether this rank
    writes them (one rank per expert-parallel position); ``pipeline_rank``: set under pipeline
    parallelism, with ``dense_writer`` true on one data-parallel rank of each pipeline rank."""

    def __init__(self, run_dir: Path, rank: int, expert_slice: slice | None = None, expert_writer: bool = False,
                 pipeline_rank: int | None = None, dense_writer: bool | None = None):
        self.directory = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.expert_slice = expert_slice
        self.expert_writer = expert_writer
        self.suffix = "" if pipeline_rank is None else f"_pp{pipeline_rank:03d}"
        self.dense_writer = rank == 0 if dense_writer is None else dense_writer

    def latest_tag(self) -> str | None:
        pointer = self.directory / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = f"step{step:08d}"
        directory = self.directory / tag
        directory.mkdir(parents=True, exist_ok=True)
        model = engine.module
        ds_internals.link_optimizer_states(engine)
        expert_names = expert_parameter_names(model)
        dense, experts = {}, {}
        for name, param in model.named_parameters():  # the same order on every rank: the gathers are collective
            state = {"value": safe_get_full_fp32_param(param).cpu()}
            state.update({key: safe_get_full_optimizer_state(param, key).cpu() for key in MOMENTS})
            if not ds_internals.is_pipe_replicated(param):
                (experts if name in expert_names else dense)[name] = state
        if self.dense_writer:
            params = dict(model.named_parameters())
            buffers = {k: v.cpu() for k, v in model.state_dict().items() if k not in params}
            torch_save_atomic({"params": dense, "buffers": buffers, "adam_step": ds_internals.adam_step(engine),
                               "client": client_state}, directory / f"dense{self.suffix}.pt")
        if experts and (self.expert_writer or self.dense_writer):
            first, last = (self.expert_slice.start, self.expert_slice.stop) if self.expert_slice else \
                (0, next(iter(experts.values()))["value"].shape[0])
            torch_save_atomic(experts, directory / f"experts_{first:05d}-{last:05d}{self.suffix}.pt")
        torch_save_atomic(_rng_state(), directory / f"rng_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            write_text_atomic(self.directory / LATEST, tag)
        dist.barrier()
        return tag

    def load(self, engine) -> tuple[str, dict]:
        """Restore the latest complete checkpoint into the engine; returns its tag and client state."""
        tag = self.latest_tag()
        if tag is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        directory = self.directory / tag
        model = engine.module
        saved = read_dense(directory)
        ds_internals.link_optimizer_states(engine)
        expert_names = expert_parameter_names(model)
        experts = {}
        if expert_names:
            rows = next(p for n, p in model.named_parameters() if n in expert_names).shape[0]
            local = self.expert_slice or slice(0, rows)
            experts = read_experts(directory, expert_names, local.start, local.stop)
        for name, param in model.named_parameters():
            state = experts[name] if name in expert_names else saved["params"][name]
            with torch.no_grad():
                param.copy_(state["value"])
            safe_set_full_fp32_param(param, state["value"].to(param.device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, state[key].to(param.device), key)
        model.load_state_dict(saved["buffers"], strict=False)
        ds_internals.set_adam_step(engine, saved["adam_step"])
        rng = directory / f"rng_rank{self.rank}.pt"
        if not rng.is_file():
            raise CheckpointError(f"{rng}: missing (the checkpoint was saved by fewer ranks; resume with as many)")
        _set_rng_state(torch.load(rng, weights_only=False))
        return tag, saved["client"]
