"""Shared by the benchmarks: the real corpus every machine has, the interleaved timer and the JSON
result writer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from data_pipeline.builtin_corpus import write_python_corpus as build_corpus
from plugins.atomic import write_text_atomic

__all__ = ["build_corpus", "time_interleaved", "write_result"]


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON atomically (its directory created if missing)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Time each step function once per round, in turn, so machine drift hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times
