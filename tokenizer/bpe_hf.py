"""Byte-level BPE trained with HF ``tokenizers`` (the default backend)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .pretokenizer import byte_level_pretokenizer
from .special_tokens import SpecialTokens

BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, specials: SpecialTokens, min_frequency: int = 2
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pretokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials.as_list(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
