"""Long documents reach a trainer as bounded windows, so training memory does not grow with the
longest document: the trainers' working set per string is tens of bytes per character (a single
50 MB document took ~4.8 GB through the HF trainer), and sentencepiece drops over-long sentences.

A window is cut after its last line break (where pre-tokenization splits anyway), else before its
last space, else at ``max_chars``; the pieces concatenate to the document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

MAX_CHUNK_CHARS = 8192


def bounded_chunks(texts: Iterable[str], max_chars: int = MAX_CHUNK_CHARS) -> Iterator[str]:
    """Each text as consecutive pieces of at most ``max_chars`` characters."""
    for text in texts:
        start = 0
        while len(text) - start > max_chars:
            end = start + max_chars
            cut = text.rfind("\n", start, end) + 1 or text.rfind(" ", start + 1, end)
            cut = cut if cut > start else end
            yield text[start:cut]
            start = cut
        if start < len(text):
            yield text[start:] if start else text
