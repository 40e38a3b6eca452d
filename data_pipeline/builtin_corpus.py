"""A real corpus present on every machine: the Python standard library's source code and its
documentation topics (``pydoc_data``), written as JSONL. It lets the tiny recipe, the tests and
the benchmarks run end to end with no download.

It has two domains, ``docs`` (the reST-derived help topics) and ``code`` (the library's modules).
One in five ``docs`` and one in ten ``code`` documents is held out of the training text, so a run can
validate per domain (issue 17) on text it never trained on: ``write_heldout`` writes those. The
choice is by content (the text's hash), not position, so a file and its identical twin elsewhere in
the library (there are some, varying with the Python version) fall on the same side."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from plugins.atomic import write_atomic

from .dedup import document_hashes

DOMAINS = ("code", "docs")
HELDOUT_EVERY = {"code": 10, "docs": 5}  # a document is held out when its text's hash is -1 modulo these
HELDOUT_CODE_BYTES = 1 << 20  # held-out code is capped: the library has far more than a validation set needs


def domain_documents(domain: str) -> list[str]:
    """All documents of one domain, in a fixed order."""
    if domain == "docs":
        from pydoc_data.topics import topics

        return [text for _, text in sorted(topics.items())]
    if domain == "code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.rglob("*.py"))]
    raise ValueError(f"unknown domain {domain!r} (expected one of {', '.join(DOMAINS)})")


def _split(domain: str) -> tuple[list[str], list[str]]:
    """(training, held-out) documents of a domain; the held-out ones each once."""
    documents, every = domain_documents(domain), HELDOUT_EVERY[domain]
    held = (document_hashes(documents) % every == every - 1).tolist() if documents else []
    return [d for d, h in zip(documents, held) if not h], list(dict.fromkeys(d for d, h in zip(documents, held) if h))


def python_documents() -> list[str]:
    """The training documents: docs first, then code, held-out documents left out."""
    return _split("docs")[0] + _split("code")[0]


def _write_jsonl(path: Path, documents: Iterable[str], budget: int) -> int:
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with tmp.open("w", encoding="utf-8") as handle:
            for text in documents:
                handle.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode("utf-8"))
                if written >= budget:
                    break

    write_atomic(path, write)
    return written


def write_python_corpus(path: Path, megabytes: int) -> int:
    """Write the training documents (repeated if the library is smaller than asked) up to
    ``megabytes`` of text to ``path`` (via a temporary name); returns the text bytes written."""
    documents = python_documents()
    budget = megabytes << 20
    repeats = budget // max(1, sum(len(d.encode("utf-8")) for d in documents)) + 1
    return _write_jsonl(path, (d for _ in range(repeats) for d in documents), budget)


def write_heldout(path: Path, domain: str) -> int:
    """Write one domain's held-out documents to ``path``; returns the text bytes written."""
    heldout = _split(domain)[1]
    return _write_jsonl(path, heldout, HELDOUT_CODE_BYTES if domain == "code" else 1 << 62)
