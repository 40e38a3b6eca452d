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
    files.json                every other file's size and SHA-256, computed while it was written
                              (``digests``), written last: a checkpoint is verified against it
                              before any reading (a truncated, missing or damaged file is named)

No rank gathers the model: a save writes views into the optimizer's own partitions, a load reads
only the stored chunks overlapping this rank's partitions, so a checkpoint written at one
(pp, ep, dp) resumes at another directly. A save is written under ``.stepNNNNNNNN.partial`` and
renamed once every rank has finished; then the ``latest`` pointer moves (write + rename), so a
run killed while saving resumes from the previous complete checkpoint. A resume whose latest
checkpoint is damaged (or whose pointer names a deleted directory) says so and falls back to the
newest earlier checkpoint that verifies; a damaged pointer, to the newest directory that does;
``--resume-from TAG`` picks one. ``keep`` > 0 prunes all but the newest ``keep`` checkpoints.
Distributed, the ranks verify a checkpoint's files between them (rank r hashes every world-th file).

An asynchronous save (``train.async_save``) copies the rank's pieces into host memory (the
staging copy, kept between saves) and writes them on a thread while training goes on; its
collectives run on a process group of their own. A save first waits for the one before. A save
that fails (a full disk, a file-size limit) removes its staging directory and raises one line
naming the last good checkpoint; ``deadline`` ends the process before the commit (the rename)
when the save cannot finish in time (``train.preempt_grace_s``).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from launch.distributed import ds_internals
from plugins.atomic import write_atomic, write_text_atomic
from plugins.errors import ProjectError
from plugins.model.experts import RoutedExperts
from plugins.progress import phase
from plugins.run_lock import hard_exit

from . import dcp_pieces
from .dcp_pieces import Piece, PieceError
from .digests import ALGORITHM, HashingWriter, file_digest

LATEST = "latest"
TRAIN_STATE = "train_state.json"
MANIFEST = "files.json"
TAG = re.compile(r"step\d{8}")
EXIT_SAVE_TIMEOUT = 5


class CheckpointError(ProjectError):
    """A checkpoint that is missing, incomplete or does not fit the model; one line naming it."""


class SaveError(CheckpointError):
    """A save that could not be written (disk full, file-size limit); names the last good checkpoint."""


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def is_checkpoint(directory: Path) -> bool:
    """A directory that was saved as a checkpoint (whether its files are intact: ``verify``)."""
    return (directory / MANIFEST).is_file()


def _manifest(directory: Path) -> dict[str, dict | int]:
    """files.json: name -> {"bytes", "sha256"} (or the size alone, from checkpoints saved before checksums)."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())
        if isinstance(entries, dict) and all(isinstance(v, int) or {"bytes", ALGORITHM} <= set(v)
                                             for v in entries.values()):
            return entries
    except (OSError, ValueError, TypeError):
        pass
    raise CheckpointError(f"{directory}: not a complete checkpoint ({MANIFEST} missing or unreadable)")


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> None:
    """Every file the checkpoint was saved with, at its saved size, and each of the files of
    ``share`` = (index, count) -- every count-th, from the index-th -- with its saved checksum;
    else one line naming the file."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    index, count = share
    for position, (name, saved) in enumerate(sorted(_manifest(directory).items())):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint is damaged)")
        size = saved if isinstance(saved, int) else saved["bytes"]
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, saved with {size} (the checkpoint is damaged)")
        if isinstance(saved, dict) and position % count == index and file_digest(path) != saved[ALGORITHM]:
            raise CheckpointError(f"{path}: its bytes differ from those saved ({ALGORITHM} mismatch; the checkpoint "
                                  "is damaged)")


def verify_agreed(directory: Path) -> None:
    """``verify`` by every rank together when distributed: each hashes its share of the files, and all
    raise the same line if any found a problem."""
    if not dcp_pieces.distributed():
        return verify(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        verify(directory, (rank, world))
        problem = None
    except CheckpointError as error:
        problem = str(error)
    problems: list = [None] * world
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise CheckpointError(first)


def read_train_state(directory: Path) -> dict:
    """A verified checkpoint's train state."""
    try:
        return json.loads((directory / TRAIN_STATE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / TRAIN_STATE}: unreadable ({error})") from None


def _write_hashed(path: Path, write) -> dict:
    """``write(stream)`` into ``path`` (atomically); returns the file's files.json entry."""
    entry = {}

    def into(tmp: Path) -> None:
        with open(tmp, "wb") as raw:
            stream = HashingWriter(raw)
            try:
                write(stream)
            except Exception:
                if stream.failure is not None:  # torch.save reports a failed write as a RuntimeError
                    raise stream.failure from None
                raise
        entry.update(stream.entry())

    write_atomic(path, into)
    return entry


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
    checkpoints to retain (0: all); ``asynchronous``: saves written on a thread from a host staging
    copy; ``timeout_s``: the saves' process group's timeout (0: torch's default)."""

    def __init__(self, run_dir: Path, rank: int = 0, world_size: int = 1, num_experts: int = 0,
                 expert_offset: int = 0, keep: int = 0, layout: dict | None = None, asynchronous: bool = False,
                 timeout_s: float = 0.0):
        self.directory = Path(run_dir) / "checkpoints"
        self.rank, self.world_size = rank, world_size
        self.num_experts, self.expert_offset, self.keep = num_experts, expert_offset, keep
        self.layout = layout or {}
        self.asynchronous, self.timeout_s = asynchronous, timeout_s
        self.last_good: str | None = None  # the newest committed checkpoint of this run
        self.group = None  # the saves' own process group, made at the first save
        self.staging: dict[str, torch.Tensor] = {}  # host copies of the rank's pieces (asynchronous saves)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer") if asynchronous \
            else None
        self.pending: Future | None = None
        self.committing = False

    # ------------------------------------------------------------------------- choosing
    def latest_tag(self) -> str | None:
        """The checkpoint the ``latest`` pointer names; None when it is missing or damaged."""
        try:
            text = (self.directory / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if TAG.fullmatch(text) else None

    def _directories(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob("step*") if p.is_dir() and TAG.fullmatch(p.name))

    def has_checkpoint(self) -> bool:
        """Whether the run has saved a checkpoint (intact or not): what ``--resume auto`` asks."""
        return (self.directory / LATEST).exists() or bool(self._directories())

    def choose(self, tag: str | None = None) -> tuple[str, list[str]]:
        """The checkpoint to resume: ``tag`` (it must verify), else the newest checkpoint not after
        ``latest`` (any, if the pointer is damaged or missing) that verifies. Returns it and one line
        per damaged checkpoint passed over. Collective when distributed."""
        if tag is not None:
            verify_agreed(self.directory / tag)
            return tag, []
        pointer, latest = self.directory / LATEST, self.latest_tag()
        skipped = [] if latest is not None or not pointer.exists() else \
            [f"{pointer}: damaged (it names no checkpoint)"]
        candidates = sorted({d for d in self._directories() if latest is None or d <= latest} | {latest} - {None},
                            reverse=True)
        if not candidates:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        problems = []
        for candidate in candidates:
            try:
                verify_agreed(self.directory / candidate)
                return candidate, skipped + problems
            except CheckpointError as error:
                problems.append(str(error))
        raise CheckpointError(f"{self.directory}: no checkpoint verifies ({problems[0]})")

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

    # --------------------------------------------------------------------------- saving
    def save(self, engine, step: int, client_state: dict, ema: dict[str, torch.Tensor] | None = None,
             deadline: tuple[float, str] | None = None) -> str:
        """Save step ``step`` (collective). Synchronous: returns once committed. Asynchronous: returns
        once the rank's pieces are staged in host memory; ``wait`` or ``poll`` learn the outcome.
        ``deadline``: (``time.monotonic()`` value, what set it) by which the save must be committed."""
        tag = f"step{step:08d}"
        timer = self._arm(deadline, tag) if deadline is not None else None
        try:
            self.wait()
            partial = self.directory / f".{tag}.partial"
            if self.group is None and dcp_pieces.distributed():
                self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s)
                                            if self.timeout_s else None)
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            self._barrier()
            pieces, state = self._pieces(engine, saving=True, ema=ema), buffers(engine.module)
            if self.asynchronous:
                pieces, state = self._stage(pieces, state)
            train_state = {**json.loads(json.dumps(client_state)), "adam_step": ds_internals.adam_step(engine),
                           "world_size": self.world_size, "layout": self.layout} if self.rank == 0 else None
            job = (tag, pieces, state, _rng_state(), train_state, timer)
            if self.asynchronous:
                self.pending = self.writer.submit(self._write, *job)
            else:
                self._write(*job)
        except BaseException:
            if timer is not None:
                timer.cancel()
            raise
        return tag

    def _stage(self, pieces: list[Piece], state: dict[str, torch.Tensor]) -> tuple[list[Piece], dict]:
        """Copies of the pieces in host memory (pinned on a GPU), reused from save to save."""
        staged = []
        for piece in pieces:
            host = self.staging.get(piece.key)
            if host is None or host.shape != piece.tensor.shape or host.dtype != piece.tensor.dtype:
                host = self.staging[piece.key] = torch.empty(piece.tensor.shape, dtype=piece.tensor.dtype,
                                                             pin_memory=piece.tensor.is_cuda)
            host.copy_(piece.tensor.detach(), non_blocking=True)
            staged.append(Piece(piece.key, piece.global_numel, piece.offset, host))
        state = {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged, state

    def _write(self, tag: str, pieces: list[Piece], state: dict, rng: dict, train_state: dict | None,
               timer: threading.Timer | None) -> None:
        """Every rank writes its files into the staging directory; once all have, rank 0 writes
        files.json, renames the directory into place and moves ``latest``."""
        try:
            self._write_and_commit(tag, pieces, state, rng, train_state)
        finally:
            if timer is not None:
                timer.cancel()

    def _write_and_commit(self, tag: str, pieces: list[Piece], state: dict, rng: dict, train_state: dict | None
                          ) -> None:
        partial, final = self.directory / f".{tag}.partial", self.directory / tag
        files, problem, failed = {}, None, None
        try:
            files.update(dcp_pieces.save(partial, pieces, state, group=self.group))
            files[f"rng_rank{self.rank}.pt"] = _write_hashed(partial / f"rng_rank{self.rank}.pt",
                                                             lambda stream: torch.save(rng, stream))
            if train_state is not None:
                text = json.dumps(train_state, indent=1).encode()
                files[TRAIN_STATE] = _write_hashed(partial / TRAIN_STATE, lambda stream: stream.write(text))
        except OSError as error:  # this rank's write failed
            problem = f"rank {self.rank}: {error}"
        except CheckpointException as error:  # another rank's did (DCP tells every rank), or a bug
            failed = error
        written, problem = self._agree(files, problem)
        if failed is not None and problem is None:
            raise failed  # no rank saw an OSError: not a full disk but a bug, with its traceback
        if problem is None and self.rank == 0:
            try:
                self.committing = True
                manifest = {name: entry for rank_files in written for name, entry in sorted(rank_files.items())}
                write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
                shutil.rmtree(final, ignore_errors=True)  # a complete save of this step the pointer never named
                partial.rename(final)
                write_text_atomic(self.directory / LATEST, tag)
                self._prune(tag)
            except OSError as error:
                problem = f"rank 0: {error}"
            finally:
                self.committing = False
        _, problem = self._agree({}, problem)
        if problem is not None:
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise SaveError(f"saving checkpoint {tag} failed ({problem}); the last good checkpoint is "
                            f"{self._last_good_path()}")
        self.last_good = tag
        if self.asynchronous and self.rank == 0:
            print(f"saved checkpoint {final} (written in the background)", flush=True)

    def _agree(self, files: dict, problem: str | None) -> tuple[list[dict], str | None]:
        """Every rank's files and the first rank's problem, on every rank."""
        if not dcp_pieces.distributed():
            return [files], problem
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (files, problem), group=self.group)
        return [f for f, _ in gathered], next((p for _, p in gathered if p is not None), None)

    def _barrier(self) -> None:
        if dcp_pieces.distributed():
            dist.barrier(group=self.group)

    def _last_good_path(self) -> str:
        return str(self.directory / self.last_good) if self.last_good else "none (no checkpoint saved yet)"

    def _arm(self, deadline: tuple[float, str], tag: str) -> threading.Timer:
        """End the process at the deadline unless the save is committed (or committing) by then."""
        at, reason = deadline

        def expire() -> None:
            if self.committing:
                return
            if self.rank == 0:
                print(f"error: the save of {tag} did not finish within {reason}; the last good checkpoint "
                      f"{self._last_good_path()} is untouched", file=sys.stderr, flush=True)
            hard_exit(EXIT_SAVE_TIMEOUT)

        timer = threading.Timer(max(0.0, at - time.monotonic()), expire)
        timer.daemon = True
        timer.start()
        return timer

    def wait(self) -> None:
        """Block until the asynchronous save in flight, if any, is committed; raises its failure."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            with phase("waiting for the previous save"):
                pending.result()

    def poll(self) -> None:
        """Raise the failure of an asynchronous save that has ended, without waiting."""
        if self.pending is not None and self.pending.done():
            self.wait()

    def close(self) -> None:
        """Wait for the save in flight (its failure is raised) and stop the writer."""
        try:
            self.wait()
        finally:
            if self.writer is not None:
                self.writer.shutdown()

    def _prune(self, latest: str) -> None:
        if self.keep <= 0:
            return
        tags = [tag for tag in self._directories() if tag != latest]
        for tag in tags[: max(0, len(tags) - (self.keep - 1))]:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    def load(self, engine, tag: str, ema: dict[str, torch.Tensor] | None = None) -> dict:
        """Restore checkpoint ``tag`` (see ``choose``) into the engine (and ``ema``'s tensors when the
        checkpoint holds an EMA), whatever layout wrote it; returns its train state, with
        ``ema_restored``."""
        directory = self.directory / tag
        state = read_train_state(directory)  # verified when chosen
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
