"""Reading a tokenizer directory (ARCHITECTURE.md, "Tokenizer dir"): tokenizer.json, the special
tokens named in tokenizer_config.json, split_table.json, and the fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


def fingerprint(tokenizer_json: Path) -> str:
    """Identity of a tokenizer: sha256 of its tokenizer.json (datasets record it in their manifest)."""
    return hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()


class TokenizerDirError(ValueError):
    """A tokenizer directory that does not meet the contract; one line naming the file."""


@dataclass
class TokenizerBundle:
    tokenizer: Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    fim_begin_id: int
    fim_hole_id: int
    fim_end_id: int
    split_table: dict[int, list[int]]
    fingerprint: str
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def load_tokenizer_dir(directory: str | Path) -> TokenizerBundle:
    directory = Path(directory)
    files = {name: directory / name for name in ("tokenizer.json", "tokenizer_config.json", "split_table.json")}
    for path in files.values():
        if not path.is_file():
            raise TokenizerDirError(f"{path}: missing (train one with `python -m tokenizer.train`)")
    try:
        tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
        config = json.loads(files["tokenizer_config.json"].read_text())
        table = {int(k): list(v) for k, v in json.loads(files["split_table.json"].read_text()).items()}
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise TokenizerDirError(f"{directory}: unreadable tokenizer files ({str(error).splitlines()[0][:200]})") from None

    def token_id(key: str, text: str | None) -> int:
        token = tokenizer.token_to_id(text) if text else None
        if token is None:
            raise TokenizerDirError(f"{files['tokenizer_config.json']}: {key} {text!r} is not a token of the vocabulary")
        return token

    fim = config.get("fim_tokens", {})
    return TokenizerBundle(
        tokenizer=tokenizer,
        bos_id=token_id("bos_token", config.get("bos_token")),
        eos_id=token_id("eos_token", config.get("eos_token")),
        pad_id=token_id("pad_token", config.get("pad_token")),
        fim_begin_id=token_id("fim_tokens.begin", fim.get("begin")),
        fim_hole_id=token_id("fim_tokens.hole", fim.get("hole")),
        fim_end_id=token_id("fim_tokens.end", fim.get("end")),
        split_table=table,
        fingerprint=fingerprint(files["tokenizer.json"]),
        directory=directory,
    )
