"""Shared by the benchmarks: the real corpus every machine has and the JSON result writer."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.builtin_corpus import write_python_corpus as build_corpus

__all__ = ["build_corpus", "write_result"]


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON under a temporary name, then rename it into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return out
