"""A real corpus every machine has: the Python standard library's code and its documentation text."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def code_documents(limit: int | None = None) -> list[str]:
    files = sorted(STDLIB.glob("*.py")) + sorted(STDLIB.glob("email/*.py")) + sorted(STDLIB.glob("json/*.py"))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files[:limit]]


def prose_documents(limit: int | None = None) -> list[str]:
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())][:limit]


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps({field: document}) + "\n")
    return path


def paragraph_documents() -> list[str]:
    """Thousands of short real documents: the paragraphs of Python's documentation topics."""
    return [p for text in prose_documents() for p in text.split("\n\n") if p.strip()]
