"""On-disk layout of a packed dataset directory, shared by the writer and the reader."""

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PIECES = "pieces.npy"  # rows: sequence, start, length, document, offset in the document
DOCUMENT_HASHES = "document_hashes.npy"  # one uint64 per document: its text's hash (``dedup``)


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """The most compact unsigned dtype holding every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_dir_name(index: int, count: int) -> str:
    """Shard ``index`` of a ``prepare --num-shards count`` run: its own complete packed directory."""
    return f"shard-{index:05d}-of-{count:05d}"
