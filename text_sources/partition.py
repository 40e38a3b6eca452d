"""A deterministic partition of the input files into ``num_shards`` shards (issue 18), so
independent jobs (a cluster's array job, or ``prepare --jobs``) each prepare one part.

The files, in their sorted order, are laid end to end as one byte range cut into ``num_shards``
equal spans. JSON Lines files are split by row: a row belongs to the shard whose span holds its
first byte (Hadoop's input-split rule), so every row lands in exactly one shard without counting
rows first. Other formats (a ``.txt`` file is one document; ``.json`` and ``.parquet`` are read
whole) go, whole, to the shard whose span holds the file's first byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITTABLE = {".jsonl"}


@dataclass(frozen=True)
class Part:
    """File ``path``'s rows whose first byte lies in ``[start, end)`` (``end`` None: the whole file)."""

    path: Path
    start: int = 0
    end: int | None = None

    def describe(self) -> str:
        return str(self.path) if self.end is None else f"{self.path}[{self.start}:{self.end}]"


def partition(files: list[Path], num_shards: int, index: int) -> list[Part]:
    """The parts of shard ``index`` of ``num_shards``; over all indices they cover every row once."""
    if num_shards == 1:
        return [Part(path) for path in files]
    sizes = [path.stat().st_size for path in files]
    total = sum(sizes)
    low, high = total * index // num_shards, total * (index + 1) // num_shards
    last = index == num_shards - 1
    parts, offset = [], 0
    for path, size in zip(files, sizes):
        if path.suffix in SPLITTABLE:
            start, end = max(low, offset), min(high, offset + size)
            if start < end:
                parts.append(Part(path, start - offset, end - offset))
        elif low <= offset < high or (last and offset == total):
            parts.append(Part(path))
        offset += size
    return parts
