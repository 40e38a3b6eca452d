"""Packing documents into fixed windows of L tokens.

Best-fit (report 4.1 via Ding et al. 2024, "Fewer Truncations Improve Language Modeling"):
documents longer than L are cut into L-sized chunks (the only truncation), then every piece
goes, longest first, into the open bin whose remaining capacity is the smallest that still
fits it (Best-Fit-Decreasing). A segment tree over capacities 0..L finds that bin in O(log L):
node values are the largest capacity available in their range, so the descent goes left
whenever the left half still holds a capacity >= the piece.

Concat (for comparison): the classic concatenate-then-split, which cuts documents anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Packing:
    """Pieces placed into sequences: piece j is ``length[j]`` tokens of document ``document[j]``
    starting at token ``doc_offset[j]`` of that document; it lands in sequence ``sequence[j]``
    at position ``start[j]``. Arrays are sorted by (sequence, start)."""

    sequence: np.ndarray
    start: np.ndarray
    length: np.ndarray
    document: np.ndarray
    doc_offset: np.ndarray
    num_sequences: int
    truncated_documents: int


def _chunk(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into ceil(n / L) pieces: (document, offset in document, length)."""
    pieces_per_doc = np.maximum(1, -(-lengths // seq_len))
    document = np.repeat(np.arange(len(lengths)), pieces_per_doc)
    first = np.cumsum(pieces_per_doc) - pieces_per_doc
    chunk_index = np.arange(len(document)) - np.repeat(first, pieces_per_doc)
    offset = chunk_index * seq_len
    length = np.minimum(seq_len, lengths[document] - offset)
    return document, offset, length


class CapacityTree:
    """Segment tree over capacities 0..L; leaf c holds c while some open bin has exactly c free."""

    def __init__(self, seq_len: int):
        self.size = 1 << (seq_len + 1 - 1).bit_length()
        self.tree = [-1] * (2 * self.size)

    def set(self, capacity: int, available: bool) -> None:
        tree, i = self.tree, capacity + self.size
        tree[i] = capacity if available else -1
        i >>= 1
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            value = left if left > right else right
            if tree[i] == value:
                break
            tree[i] = value
            i >>= 1

    def smallest_at_least(self, need: int) -> int:
        """The smallest available capacity >= need, or -1."""
        tree = self.tree
        if tree[1] < need:
            return -1
        i, size = 1, self.size
        while i < size:
            i <<= 1
            if tree[i] < need:
                i += 1
        return i - size


def _check(lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() <= 0:
        raise ValueError("every document must have at least one token")
    return lengths


def best_fit_decreasing(lengths: np.ndarray, seq_len: int) -> Packing:
    lengths = _check(lengths)
    document, offset, length = _chunk(lengths, seq_len)
    order = np.lexsort((np.arange(len(length)), -length))  # longest first, ties in input order
    tree = CapacityTree(seq_len)
    bins_with: list[list[int]] = [[] for _ in range(seq_len + 1)]
    fill: list[int] = []
    placed_bin = np.empty(len(length), dtype=np.int64)
    placed_start = np.empty(len(length), dtype=np.int64)
    for piece, size in zip(order.tolist(), length[order].tolist()):
        capacity = tree.smallest_at_least(size)
        if capacity < 0:
            target, capacity = len(fill), seq_len
            fill.append(0)
        else:
            stack = bins_with[capacity]
            target = stack.pop()
            if not stack:
                tree.set(capacity, False)
        placed_bin[piece], placed_start[piece] = target, fill[target]
        fill[target] += size
        left = capacity - size
        if left > 0:
            if not bins_with[left]:
                tree.set(left, True)
            bins_with[left].append(target)
    return _sorted_packing(placed_bin, placed_start, length, document, offset, len(fill), lengths, seq_len)


def concatenate(lengths: np.ndarray, seq_len: int) -> Packing:
    """Concatenate all documents and cut every L tokens."""
    lengths = _check(lengths)
    doc_start = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    cuts = np.arange(0, total, seq_len)
    boundaries = np.union1d(doc_start[lengths > 0], cuts)
    piece_len = np.diff(np.append(boundaries, total))
    document = np.searchsorted(np.cumsum(lengths), boundaries, side="right")
    offset = boundaries - doc_start[document]
    sequence, start = boundaries // seq_len, boundaries % seq_len
    truncated = int(np.count_nonzero((doc_start % seq_len) + lengths > seq_len))
    return Packing(sequence, start, piece_len, document, offset, len(cuts), truncated)


def _sorted_packing(sequence, start, length, document, offset, num_sequences, lengths, seq_len) -> Packing:
    order = np.lexsort((start, sequence))
    return Packing(
        sequence=sequence[order], start=start[order], length=length[order], document=document[order],
        doc_offset=offset[order], num_sequences=num_sequences,
        truncated_documents=int(np.count_nonzero(lengths > seq_len)),
    )


PACKERS = {"best-fit": best_fit_decreasing, "concat": concatenate}
