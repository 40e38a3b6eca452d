"""Per-document token stream: FIM with probability ``fim_rate`` (PSM), tokenization, random
splitting of punctuation+line-break tokens with probability ``split_rate``, BOS/EOS framing.

A document becomes ``<bos> tokens <eos>`` or, under FIM,
``<bos> <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>``. Every random choice of
document i comes from a generator seeded with (seed, i) — (seed, shards, shard, i) in shard
``shard`` of a sharded ``prepare`` — so the output depends only on the seed, the sharding and
the input order, never on batching or worker count.

Bounded memory (issue 20): text is tokenized in windows of at most ``WINDOW_CHARS`` characters,
at most ``CALL_CHARS`` characters per tokenizer call, so the tokenizer's working set (tens of
bytes per character) is bounded whatever the document's length; a document costs its text and
4 bytes per token beyond that. A window ends after a line break followed by a non-space character,
else before a space followed by an ASCII letter or punctuation mark: with this project's pre-tokenizer
(``tokenizer.pretokenizer``) no pre-token crosses such a point, so the tokens equal those of the
whole text. Only a window with neither (a ``WINDOW_CHARS`` run without a space) is cut at its end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tokenizer.load import TokenizerBundle

from .fim import fim_split
from .token_split import TokenSplitter

WINDOW_CHARS = 1 << 16
CALL_CHARS = 1 << 22


@dataclass
class EncodedDocument:
    ids: np.ndarray
    fim: bool
    split_tokens: int


def _cut(text: str, start: int, window: int) -> int:
    """The end of the window starting at ``start``: a point no pre-token crosses, if one exists."""
    end = start + window
    if end >= len(text):
        return len(text)
    for mark, after, follows in (("\n", 1, _AFTER_LINE_BREAK), (" ", 0, _AFTER_SPACE)):
        point = text.rfind(mark, start, end)
        while point >= start:
            if point + after > start and follows(text[point + 1]):
                return point + after
            point = text.rfind(mark, start, point)
    return end


def _AFTER_LINE_BREAK(char: str) -> bool:
    return not char.isspace()


def _AFTER_SPACE(char: str) -> bool:
    """An ASCII letter or punctuation: the space opens its pre-token (digits and CJK are split out first)."""
    return char.isascii() and not char.isspace() and not char.isdigit()


def windows(text: str, window: int = WINDOW_CHARS) -> list[str]:
    """``text`` as consecutive pieces of at most ``window`` characters (see the module doc)."""
    if len(text) <= window:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = _cut(text, start, window)
        pieces.append(text[start:end])
        start = end
    return pieces


class DocumentEncoder:
    def __init__(self, bundle: TokenizerBundle, fim_rate: float, split_rate: float, seed: int | tuple[int, ...],
                 window: int = WINDOW_CHARS):
        self.bundle, self.fim_rate, self.split_rate, self.window = bundle, fim_rate, split_rate, window
        self.seed = (seed,) if isinstance(seed, int) else tuple(seed)
        self.splitter = TokenSplitter(bundle.split_table or {}, bundle.vocab_size)

    def encode(self, texts: list[str], first_index: int) -> list[EncodedDocument]:
        """Encode documents ``first_index, first_index + 1, ...``, their windows batched through the tokenizer."""
        rngs = [np.random.default_rng([*self.seed, first_index + i]) for i in range(len(texts))]
        segments: list[list[str]] = []
        for text, rng in zip(texts, rngs):
            if rng.random() < self.fim_rate:
                prefix, middle, suffix = fim_split(text, rng)
                segments.append([prefix, suffix, middle])
            else:
                segments.append([text])
        pieces = [windows(segment, self.window) for parts in segments for segment in parts]
        ids = self._tokenize([piece for segment in pieces for piece in segment])
        b = self.bundle
        out, cursor = [], 0
        for parts, rng in zip(segments, rngs):
            fim = len(parts) == 3
            markers = [[b.bos_id, b.fim_begin_id], [b.fim_hole_id], [b.fim_end_id]] if fim else [[b.bos_id]]
            chunks, split_tokens = [], 0
            for marker, segment in zip(markers, pieces[cursor : cursor + len(parts)]):
                chunks.append(np.asarray(marker, dtype=np.int32))
                for _ in segment:  # the rng's draws in window order: those of the whole segment
                    piece, count = self.splitter(next(ids), self.split_rate, rng)
                    chunks.append(piece)
                    split_tokens += count
            chunks.append(np.asarray([b.eos_id], dtype=np.int32))
            cursor += len(parts)
            out.append(EncodedDocument(np.concatenate(chunks), fim, split_tokens))
        return out

    def _tokenize(self, texts: list[str]) -> Iterator[np.ndarray]:
        """Token ids of each text, at most ``CALL_CHARS`` characters per batched tokenizer call."""
        batch: list[str] = []
        size = 0
        for text in [*texts, None]:
            if text is None or (batch and size + len(text) > CALL_CHARS):
                encodings = self.bundle.tokenizer.encode_batch_fast(batch, add_special_tokens=False)
                yield from (np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings)
                batch, size = [], 0
            if text is not None:
                batch.append(text)
                size += len(text)
