"""BPE with byte fallback trained by ``sentencepiece`` (``--backend sentencepiece``), for users who
want a ``tokenizer.model``; converted to the same ``tokenizer.json`` contract as the default.

Normalisation is the identity and no whitespace is collapsed, so text round-trips exactly, with
one caveat of sentencepiece's design: a literal U+2581 (▁, its space symbol) decodes as a space.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers

from .special_tokens import SpecialTokens

MAX_CHUNK_CHARS = 8192
MAX_SENTENCES = 2_000_000  # sentencepiece keeps its sample in memory: bound it


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    """sentencepiece drops over-long sentences: cut documents at line ends into bounded chunks."""
    for text in texts:
        while len(text) > MAX_CHUNK_CHARS:
            cut = text.rfind("\n", 0, MAX_CHUNK_CHARS) + 1 or MAX_CHUNK_CHARS
            yield text[:cut]
            text = text[cut:]
        if text:
            yield text


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int, specials: SpecialTokens) -> tuple[Tokenizer, bytes]:
    """Returns the converted ``tokenizers.Tokenizer`` and the serialized sentencepiece model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts),
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
        user_defined_symbols=specials.as_list(),
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
    mergeable = {p for p, i in vocab.items() if not (sp.is_byte(i) or sp.is_unknown(i) or p in specials.as_list())}
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
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(specials.as_list())
    return tokenizer
