"""A run's ``metrics.jsonl`` as the figures read it: train records (one per logged step, with a
``loss``, and each MoE block's load-share spread), evaluation records (with a ``val``) and the
expert-load matrices, held in bounded, evenly thinned histories so a long run at 58 blocks x 256
experts stays a few tens of MB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plugins.errors import ProjectError

TRAIN_ROWS = 4096  # scalar curves: plenty of points for a figure
LOAD_ROWS = 512  # time rows of the time x expert heatmaps
PLOTTED = ("step", "loss", "lm_loss", "mtp_loss")


class Thinned:
    """At most ``capacity`` items, evenly spaced over everything appended (every ``stride``-th, the
    stride doubling when full), plus always the latest one."""

    def __init__(self, capacity: int):
        self.capacity, self.stride, self.seen = capacity, 1, 0
        self.kept: list = []
        self.latest = None

    def append(self, item) -> None:
        if self.seen % self.stride == 0:
            self.kept.append(item)
            if len(self.kept) >= self.capacity:
                self.kept, self.stride = self.kept[::2], self.stride * 2
        self.seen += 1
        self.latest = item

    @property
    def items(self) -> list:
        if self.latest is None or (self.kept and self.kept[-1] is self.latest):
            return list(self.kept)
        return [*self.kept, self.latest]


@dataclass
class LoadSample:
    step: int
    tokens: int
    loads: np.ndarray  # float32 [MoE blocks, experts]


@dataclass
class History:
    """What the figures plot: thinned train records (without their load matrix), thinned load
    matrices, and every evaluation record."""

    train: Thinned = field(default_factory=lambda: Thinned(TRAIN_ROWS))
    loads: Thinned = field(default_factory=lambda: Thinned(LOAD_ROWS))
    evals: list[dict] = field(default_factory=list)

    def add_train(self, record: dict, loads: np.ndarray | None) -> dict:
        """Keeps the record with its per-block load-share min/max/std; returns those statistics."""
        record = {k: v for k, v in record.items() if k != "expert_load"}
        stats = {}
        if loads is not None and np.size(loads):
            loads = np.asarray(loads, dtype=np.float32)
            stats = load_share_stats(loads)
            self.loads.append(LoadSample(record["step"], record["tokens"], loads))
        self.train.append({**record, **stats})
        return stats

    def add_eval(self, record: dict) -> None:
        self.evals.append(record)


def load_share_stats(loads: np.ndarray) -> dict[str, list[float]]:
    """Per MoE block [M, E]: min, max and std of each expert's share of the block's routed tokens
    (uniform = 1/E)."""
    loads = np.asarray(loads, dtype=np.float64)
    share = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1.0)
    return {"load_min": share.min(axis=1).tolist(), "load_max": share.max(axis=1).tolist(),
            "load_std": share.std(axis=1).tolist()}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``("train" | "eval", record)`` of each line of a metrics.jsonl, streamed; a line that is neither
    a train record (numbers step, loss, lm_loss, mtp_loss) nor an evaluation record (step, val) is an
    error naming the line."""
    if not path.is_file():
        raise ProjectError(f"{path}: no metrics (is {path.parent} a run directory?)")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ProjectError(f"{path}: line {number}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ProjectError(f"{path}: line {number}: invalid JSON") from None
            if isinstance(record, dict) and isinstance(record.get("val"), dict) and _is_number(record.get("step")):
                yield "eval", record
            elif isinstance(record, dict) and all(_is_number(record.get(key)) for key in PLOTTED):
                yield "train", record
            else:
                raise ProjectError(f"{path}: line {number}: expected a train record (numbers "
                                   f"{', '.join(PLOTTED)}) or an evaluation record (step, val)")


def read_history(run_dir: Path) -> History:
    """``RUN_DIR/metrics.jsonl`` as the figures read it."""
    path = run_dir / "metrics.jsonl"
    history = History()
    for kind, record in read_records(path):
        if kind == "eval":
            history.add_eval(record)
        else:
            history.add_train(record, record.get("expert_load"))
    if not history.train.items and not history.evals:
        raise ProjectError(f"{path}: empty")
    return history
