"""Exact-duplicate documents between prepared directories: ``prepare`` keeps a 64-bit hash of each
document's text (``document_hashes.npy``, before FIM and splitting, so the hash does not depend on
the seed), and ``data_pipeline.inspect --validation`` counts a validation set's documents whose
text is also in the training sources."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .dataset import DatasetError
from .layout import DOCUMENT_HASHES


def document_hashes(texts: list[str]) -> np.ndarray:
    """The 64-bit BLAKE2b hash of each text's UTF-8 bytes."""
    return np.array([int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
                     for text in texts], dtype=np.uint64)


def read_hashes(directory: Path) -> np.ndarray:
    path = directory / DOCUMENT_HASHES
    if not path.is_file():
        raise DatasetError(f"{path}: missing (prepared before document hashes were kept); prepare it again to "
                           "check it for duplicates")
    return np.load(path, mmap_mode="r")


def duplicates(validation: list[Path], training: list[Path]) -> tuple[int, int]:
    """(documents of the ``validation`` directories whose text is in a ``training`` directory, all
    documents of ``validation``); one training directory's hashes in memory at a time."""
    held = np.concatenate([read_hashes(d) for d in validation])
    seen = np.zeros(len(held), dtype=bool)
    for directory in training:
        seen |= np.isin(held, read_hashes(directory))
    return int(seen.sum()), len(held)
