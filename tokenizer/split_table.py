"""The split table (report 4.1, token-boundary bias): every vocabulary token that joins
punctuation with line breaks, mapped to >= 2 tokens of the same vocabulary with the same bytes.

``{".\\n\\n" id: [".", "\\n\\n"]}``: the data pipeline replaces such tokens by their pieces at
random during training, so the model also sees the boundary that a prompt without a trailing
line break produces.
"""

from __future__ import annotations

import unicodedata

from tokenizers import Tokenizer

LINE_BREAKS = "\r\n"


def is_punctuation_with_line_break(text: str) -> bool:
    return any(c in LINE_BREAKS for c in text) and any(unicodedata.category(c)[0] in "PS" for c in text)


def _boundary(text: str) -> int:
    """Where the punctuation part meets the line-break part."""
    first_break = next(i for i, c in enumerate(text) if c in LINE_BREAKS)
    if first_break > 0:
        return first_break
    return next((i for i, c in enumerate(text) if c not in LINE_BREAKS), len(text))


def build_split_table(tokenizer: Tokenizer) -> dict[int, list[int]]:
    """Token id -> piece ids, for every non-special token mixing punctuation and line breaks."""
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    table: dict[int, list[int]] = {}
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token in special:
            continue
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text or not is_punctuation_with_line_break(text):
            continue
        cut = _boundary(text)
        if not 0 < cut < len(text):
            continue
        pieces = [
            piece
            for part in (text[:cut], text[cut:])
            for piece in tokenizer.encode(part, add_special_tokens=False).ids
        ]
        if len(pieces) >= 2 and tokenizer.decode(pieces, skip_special_tokens=False) == text:
            table[token_id] = pieces
    return table
