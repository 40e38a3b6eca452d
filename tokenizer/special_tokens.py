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
