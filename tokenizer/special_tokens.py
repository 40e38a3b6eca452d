"""Special tokens, DeepSeek-V3's strings by default (report 3.1 FIM; the released tokenizer)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields


@dataclass(frozen=True)
class SpecialTokens:
    """Each one id, placed first in the vocabulary in this order (BOS 0, EOS 1 as in DeepSeek-V3)."""

    bos: str = "<｜begin▁of▁sentence｜>"
    eos: str = "<｜end▁of▁sentence｜>"
    pad: str = "<｜▁pad▁｜>"
    fim_hole: str = "<｜fim▁hole｜>"
    fim_begin: str = "<｜fim▁begin｜>"
    fim_end: str = "<｜fim▁end｜>"

    def __post_init__(self) -> None:
        values = astuple(self)
        for f in fields(self):
            if not getattr(self, f.name):
                raise ValueError(f"special token {f.name}: must be a non-empty string")
        if len(set(values)) != len(values):
            raise ValueError(f"special tokens must be distinct, got {values}")

    def as_list(self) -> list[str]:
        return list(astuple(self))

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def first_twins(tokens: dict[str, object]) -> tuple[str, str] | None:
    """The first two names whose tokens are the same (an id stands for one token), or None; a None
    token (one not set) has no twin. ``tokenizer.train`` checks its flags with it, ``prepare`` the
    tokenizer it is given."""
    seen: dict[object, str] = {}
    for name, token in tokens.items():
        if token is None:
            continue
        if token in seen:
            return seen[token], name
        seen[token] = name
    return None
