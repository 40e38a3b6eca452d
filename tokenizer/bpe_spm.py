"""BPE with byte fallback trained by ``sentencepiece`` (``--backend sentencepiece``), for users who
want a ``tokenizer.model``; converted to the same ``tokenizer.json`` contract as the default.

Normalisation is the identity and no whitespace is collapsed. The special tokens are
sentencepiece *control* symbols: ids only, never matched in text (user-defined symbols would be).
sentencepiece itself writes a space as U+2581 (▁), so a literal ▁ — DeepSeek-V3's special tokens
contain it — would decode as a space; the converted tokenizer escapes it (``ESCAPE``) and so
round-trips every text exactly.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers

from .chunking import MAX_CHUNK_CHARS
from .special_tokens import SpecialTokens

MAX_SENTENCES = 2_000_000  # sentencepiece keeps its sample in memory: bound it
# Escapes in the normalized text (Unicode noncharacters, reserved for internal use): a literal
# ESCAPE becomes ESCAPE+ESCAPED_ESCAPE and a literal ▁ ESCAPE+ESCAPED_SPACE_SYMBOL, both spelled
# in byte-fallback tokens; after the escapes every ESCAPE starts a pair, so decoding is exact.
ESCAPE, ESCAPED_ESCAPE, ESCAPED_SPACE_SYMBOL = "\ufdd0", "\ufdd1", "\ufdd2"


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int, specials: SpecialTokens) -> tuple[Tokenizer, bytes]:
    """Returns the converted ``tokenizers.Tokenizer`` and the serialized sentencepiece model; ``texts``
    must be chunks of at most ``MAX_CHUNK_CHARS`` (``chunking.bounded_chunks``)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=4 * MAX_CHUNK_CHARS,
        input_sentence_size=MAX_SENTENCES,
        shuffle_input_sentence=True,
        control_symbols=specials.as_list(),
        unk_id=len(specials.as_list()),
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=1,
    )
    return to_tokenizers(model.getvalue(), specials), model.getvalue()


def to_tokenizers(model_proto: bytes, specials: SpecialTokens) -> Tokenizer:
    """A ``tokenizers`` BPE with the sentencepiece vocabulary; merges ranked by piece id (= score)."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    mergeable = {p for p, i in vocab.items() if not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i))}
    merges = sorted(
        ((piece[:cut], piece[cut:]) for piece in mergeable for cut in range(1, len(piece))
         if piece[:cut] in mergeable and piece[cut:] in mergeable),
        key=lambda pair: (vocab[pair[0] + pair[1]], vocab[pair[0]], vocab[pair[1]]),
    )
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True)
    )
    # No pre-tokenizer: like sentencepiece, BPE runs over the whole text; pieces across its word
    # boundaries do not exist in the vocabulary, so merges cannot form them.
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(ESCAPE, ESCAPE + ESCAPED_ESCAPE),
        normalizers.Replace("▁", ESCAPE + ESCAPED_SPACE_SYMBOL),
        normalizers.Replace(" ", "▁"),
    ])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Replace(ESCAPE + ESCAPED_SPACE_SYMBOL, "▁"), decoders.Replace(ESCAPE + ESCAPED_ESCAPE, ESCAPE),
    ])
    tokenizer.add_special_tokens(specials.as_list())
    return tokenizer
