"""Per-document token stream: FIM with probability ``fim_rate`` (PSM), tokenization, random
splitting of punctuation+line-break tokens with probability ``split_rate``, BOS/EOS framing.

A document becomes ``<bos> tokens <eos>`` or, under FIM,
``<bos> <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>``. Every random choice of
document i comes from a generator seeded with (seed, i), so the output depends only on the
seed and the input order, never on batching or worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenizer.load import TokenizerBundle

from .fim import fim_split
from .token_split import TokenSplitter


@dataclass
class EncodedDocument:
    ids: np.ndarray
    fim: bool
    split_tokens: int


class DocumentEncoder:
    def __init__(self, bundle: TokenizerBundle, fim_rate: float, split_rate: float, seed: int):
        self.bundle, self.fim_rate, self.split_rate, self.seed = bundle, fim_rate, split_rate, seed
        self.splitter = TokenSplitter(bundle.split_table, bundle.vocab_size)

    def encode(self, texts: list[str], first_index: int) -> list[EncodedDocument]:
        """Encode documents ``first_index, first_index + 1, ...`` with one batched tokenizer call."""
        rngs = [np.random.default_rng([self.seed, first_index + i]) for i in range(len(texts))]
        segments: list[list[str]] = []
        for text, rng in zip(texts, rngs):
            if rng.random() < self.fim_rate:
                prefix, middle, suffix = fim_split(text, rng)
                segments.append([prefix, suffix, middle])
            else:
                segments.append([text])
        flat = [segment for parts in segments for segment in parts]
        encodings = self.bundle.tokenizer.encode_batch_fast(flat, add_special_tokens=False)
        out, cursor = [], 0
        for parts, rng in zip(segments, rngs):
            pieces, split_tokens = [], 0
            for encoding in encodings[cursor : cursor + len(parts)]:
                ids, count = self.splitter(np.asarray(encoding.ids, dtype=np.int64), self.split_rate, rng)
                pieces.append(ids)
                split_tokens += count
            cursor += len(parts)
            out.append(EncodedDocument(self._frame(pieces), len(parts) == 3, split_tokens))
        return out

    def _frame(self, pieces: list[np.ndarray]) -> np.ndarray:
        b = self.bundle
        if len(pieces) == 1:
            parts = [[b.bos_id], pieces[0], [b.eos_id]]
        else:
            prefix, suffix, middle = pieces
            parts = [[b.bos_id, b.fim_begin_id], prefix, [b.fim_hole_id], suffix, [b.fim_end_id], middle, [b.eos_id]]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
