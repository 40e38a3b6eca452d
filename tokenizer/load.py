"""Reading a tokenizer directory (ARCHITECTURE.md, "Tokenizer dir"): tokenizer.json, the special
tokens named in tokenizer_config.json, split_table.json, and the fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from plugins.errors import ProjectError


def fingerprint(tokenizer_json: Path) -> str:
    """Identity of a tokenizer: sha256 of its tokenizer.json (datasets record it in their manifest)."""
    return hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()


class TokenizerDirError(ProjectError):
    """A tokenizer directory that does not meet the contract; one line naming the file."""


@dataclass
class TokenizerBundle:
    """A tokenizer directory: this project's (``tokenizer.train``) or a HF one (``transformers``'
    layout). Evaluation and generation need BOS/EOS; the data pipeline also needs the pad and FIM
    tokens and the split table (``require_pipeline_tokens``).

    Text is always text: ``encode`` (and ``tokenizer``, which the data pipeline batches through)
    never turns a special token's literal string into its id, so a document quoting
    ``<｜end▁of▁sentence｜>`` cannot inject an EOS; only the callers insert control ids."""

    tokenizer: Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int | None
    fim_begin_id: int | None
    fim_hole_id: int | None
    fim_end_id: int | None
    split_table: dict[int, list[int]] | None
    fingerprint: str
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of text each token id stands for (0 for special tokens): bits per byte of
        tokenized data divides by their sum. Exact for byte-level BPE (one alphabet symbol per
        byte); otherwise byte-fallback pieces ``<0xNN>`` count one byte and other tokens the bytes
        of their decoded text."""
        special = set(self.tokenizer.get_added_tokens_decoder())
        byte_level = (json.loads(self.tokenizer.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
        lengths = []
        for token_id in range(self.vocab_size):
            token = self.tokenizer.id_to_token(token_id)
            if token_id in special or token is None:
                lengths.append(0)
            elif byte_level:
                lengths.append(len(token))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                lengths.append(1)
            else:
                lengths.append(len(self.tokenizer.decode([token_id]).encode("utf-8")))
        return lengths

    def require_pipeline_tokens(self) -> TokenizerBundle:
        """The data pipeline's needs: pad and FIM tokens and ``split_table.json``."""
        config = self.directory / "tokenizer_config.json"
        for key, value in [("pad_token", self.pad_id), ("fim_tokens.begin", self.fim_begin_id),
                           ("fim_tokens.hole", self.fim_hole_id), ("fim_tokens.end", self.fim_end_id)]:
            if value is None:
                raise TokenizerDirError(f"{config}: {key} missing (train the tokenizer with `python -m tokenizer.train`)")
        if self.split_table is None:
            raise TokenizerDirError(f"{self.directory / 'split_table.json'}: missing (train one with "
                                    "`python -m tokenizer.train`)")
        return self


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or transformers' {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path, expected: str, kind: type):
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise TokenizerDirError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise TokenizerDirError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(value, kind):
        raise TokenizerDirError(f"{path}: expected {expected}, got {type(value).__name__}")
    return value


def _split_table(path: Path, vocab_size: int) -> dict[int, list[int]]:
    """``{"token id": [piece ids, ...]}`` with every id in the vocabulary."""
    table = _read_json(path, "an object {token id: [piece ids]}", dict)
    for key, pieces in table.items():
        if not (key.isdigit() and int(key) < vocab_size and isinstance(pieces, list) and len(pieces) >= 2
                and all(type(p) is int and 0 <= p < vocab_size for p in pieces)):
            raise TokenizerDirError(f"{path}: entry {key!r}: expected a token id of the vocabulary mapped to >= 2 "
                                    f"piece ids below {vocab_size}")
    return {int(k): v for k, v in table.items()}


def load_tokenizer_dir(directory: str | Path) -> TokenizerBundle:
    directory = Path(directory)
    files = {name: directory / name for name in ("tokenizer.json", "tokenizer_config.json", "split_table.json")}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not files[name].is_file():
            raise TokenizerDirError(f"{files[name]}: missing (a tokenizer directory needs tokenizer.json and "
                                    "tokenizer_config.json; train one with `python -m tokenizer.train`)")
    try:
        tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise TokenizerDirError(f"{files['tokenizer.json']}: unreadable ({str(error).splitlines()[0][:200]})") from None
    tokenizer.encode_special_tokens = True  # special tokens' text is split like any text (not saved in the file)
    config = _read_json(files["tokenizer_config.json"], "an object of tokenizer settings", dict)
    table = None
    if files["split_table.json"].is_file():
        table = _split_table(files["split_table.json"], tokenizer.get_vocab_size())

    def token_id(key: str, value, required: bool = True) -> int | None:
        text = _token_text(value)
        token = tokenizer.token_to_id(text) if isinstance(text, str) and text else None
        if token is None and (required or text):
            raise TokenizerDirError(f"{files['tokenizer_config.json']}: {key} {text!r} is not a token of the vocabulary")
        return token

    fim = config.get("fim_tokens") or {}
    if not isinstance(fim, dict):
        raise TokenizerDirError(f"{files['tokenizer_config.json']}: fim_tokens: expected an object "
                                "{\"begin\", \"hole\", \"end\"}")
    return TokenizerBundle(
        tokenizer=tokenizer,
        bos_id=token_id("bos_token", config.get("bos_token")),
        eos_id=token_id("eos_token", config.get("eos_token")),
        pad_id=token_id("pad_token", config.get("pad_token"), required=False),
        fim_begin_id=token_id("fim_tokens.begin", fim.get("begin"), required=False),
        fim_hole_id=token_id("fim_tokens.hole", fim.get("hole"), required=False),
        fim_end_id=token_id("fim_tokens.end", fim.get("end"), required=False),
        split_table=table,
        fingerprint=fingerprint(files["tokenizer.json"]),
        directory=directory,
    )
