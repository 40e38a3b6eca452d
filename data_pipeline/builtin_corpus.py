"""A real corpus present on every machine: the Python standard library's source code and its
documentation topics (``pydoc_data``), written as JSONL. It lets the tiny recipe, the tests and
the benchmarks run end to end with no download."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from plugins.atomic import write_atomic


def python_documents() -> list[str]:
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = [text for _, text in sorted(topics.items())]
    documents += [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.rglob("*.py"))]
    return documents


def write_python_corpus(path: Path, megabytes: int) -> int:
    """Write the documents (repeated if the library is smaller than asked) up to ``megabytes`` of
    text to ``path`` (via a temporary name); returns the text bytes written."""
    documents = python_documents()
    budget = megabytes << 20

    def write(tmp: Path) -> None:
        nonlocal written
        with tmp.open("w", encoding="utf-8") as handle:
            while written < budget:
                for text in documents:
                    handle.write(json.dumps({"text": text}) + "\n")
                    written += len(text.encode("utf-8"))
                    if written >= budget:
                        break

    written = 0
    write_atomic(path, write)
    return written
