"""A real corpus every machine has for benchmarks: the Python standard library's code and its
documentation text, written as JSONL up to a requested size (repeating the library if needed)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def build_corpus(path: Path, megabytes: int) -> int:
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
