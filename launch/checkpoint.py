"""Checkpoints in ``RUN_DIR/checkpoints``: DeepSpeed's model/optimizer states per tag, each rank's
RNG states, and the trainer's client state (step, tokens, sampler position).

A checkpoint is complete only once the ``latest`` pointer names it. The pointer is replaced
atomically (write + rename) after every rank has finished writing, so a run killed while saving
resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int):
        self.directory = Path(run_dir) / "checkpoints"
        self.rank = rank

    def latest_tag(self) -> str | None:
        pointer = self.directory / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        rng_path = self.directory / tag / f"rng_rank{self.rank}.pt"
        torch.save(_rng_state(), rng_path.with_suffix(".tmp"))
        os.replace(rng_path.with_suffix(".tmp"), rng_path)
        dist.barrier()
        if self.rank == 0:
            pointer = self.directory / f"{LATEST}.tmp"
            pointer.write_text(tag)
            os.replace(pointer, self.directory / LATEST)
        dist.barrier()
        return tag

    def load(self, engine) -> tuple[str, dict]:
        """Restore the latest complete checkpoint; returns its tag and the client state."""
        tag = self.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
        _, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if client_state is None:
            raise FileNotFoundError(f"{self.directory / tag}: checkpoint could not be read")
        _set_rng_state(torch.load(self.directory / tag / f"rng_rank{self.rank}.pt", weights_only=False))
        return tag, client_state
