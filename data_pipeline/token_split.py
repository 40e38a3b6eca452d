"""Random splitting of punctuation+line-break tokens (report 4.1, token-boundary bias): each
occurrence of a split-table token is replaced, with probability ``rate``, by its pieces."""

from __future__ import annotations

import numpy as np


class TokenSplitter:
    def __init__(self, table: dict[int, list[int]], vocab_size: int):
        self.piece_count = np.ones(vocab_size, dtype=np.int64)
        self.piece_start = np.zeros(vocab_size, dtype=np.int64)
        self.splittable = np.zeros(vocab_size, dtype=bool)
        flat: list[int] = []
        for token, pieces in table.items():
            self.splittable[token] = True
            self.piece_count[token] = len(pieces)
            self.piece_start[token] = len(flat)
            flat.extend(pieces)
        self.pieces = np.asarray(flat, dtype=np.int64)

    def __call__(self, ids: np.ndarray, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Returns the new ids and how many tokens were split."""
        if rate <= 0 or ids.size == 0:
            return ids, 0
        chosen = self.splittable[ids] & (rng.random(ids.size) < rate)
        count = int(chosen.sum())
        if count == 0:
            return ids, 0
        width = np.where(chosen, self.piece_count[ids], 1)
        position = np.cumsum(width) - width
        out = np.empty(int(width.sum()), dtype=ids.dtype)
        out[position[~chosen]] = ids[~chosen]
        split_ids = ids[chosen]
        lengths = self.piece_count[split_ids]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[np.repeat(position[chosen], lengths) + within] = self.pieces[np.repeat(self.piece_start[split_ids], lengths) + within]
        return out, count
