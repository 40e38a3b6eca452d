"""Pre-tokenization in the spirit of DeepSeek-V3's byte-level BPE (report 4.1).

Pieces, in order: digits in groups of at most three; runs of CJK ideographs and kana/hangul;
then words (with one leading space), punctuation runs *with the line breaks that follow them*
(the merged punctuation+newline tokens the report splits at random), line breaks with the
spaces before them, and other whitespace. Every piece is then mapped to byte-level symbols,
so any byte string is representable and decoding is exact.
"""

from tokenizers import Regex, pre_tokenizers

DIGITS = r"\p{N}{1,3}"
CJK = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]+"
MAIN = r" ?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_level_pretokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(DIGITS), behavior="isolated"),
            pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
            pre_tokenizers.Split(Regex(MAIN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
