"""Shared by the benchmarks: a real corpus every machine has (the Python standard library's code
and documentation text as JSONL, repeated up to the requested size) and the JSON result writer."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def build_corpus(path: Path, megabytes: int) -> int:
    """Write the corpus to ``path``; returns its text bytes."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = [text for _, text in sorted(topics.items())]
    documents += [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.rglob("*.py"))]
    budget, written = megabytes << 20, 0
    with path.open("w", encoding="utf-8") as handle:
        while written < budget:
            for text in documents:
                handle.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode("utf-8"))
                if written >= budget:
                    break
    return written


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON under a temporary name, then rename it into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return out
