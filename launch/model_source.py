"""Where the evaluation and inference entry points take a model and its tokenizer from: a run
directory (its latest checkpoint), one checkpoint directory (``RUN_DIR/checkpoints/stepN``) or a
HF DeepseekV3 directory (``config.json`` + safetensors)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from plugins.config import ConfigError
from plugins.model import DeepSeekV3


@dataclass
class TextTokenizer:
    """What evaluation and generation need of a tokenizer directory: encoding and BOS/EOS."""

    tokenizer: Tokenizer
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class LoadedModel:
    model: DeepSeekV3
    tokenizer_dir: Path | None  # the run's tokenizer (run and checkpoint directories), else None
    run_dir: Path | None
    description: str


def load_model(path: str | Path) -> LoadedModel:
    """A run dir, a checkpoint dir or a HF dir -> the model in eval mode, float32, on the GPU when
    there is one."""
    from launch.checkpoint import is_checkpoint
    from launch.convert import load_checkpoint_model
    from launch.recipe import load_run_config

    path = Path(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (path / "config.json").is_file():
        return LoadedModel(DeepSeekV3.from_hf(path).to(device).eval(), None, None, f"HF checkpoint {path}")
    if is_checkpoint(path):
        run_dir, tag = path.parent.parent, path.name
    elif (path / "config.yaml").is_file():
        run_dir, tag = path, None
    else:
        raise ConfigError(f"{path}: not a run directory (config.yaml), a checkpoint directory "
                          "(dense.pt) or a HF directory (config.json)")
    model, tag = load_checkpoint_model(run_dir, tag)
    tokenizer_dir = Path(load_run_config(run_dir / "config.yaml").data.tokenizer)
    return LoadedModel(model.to(device).eval(), tokenizer_dir, run_dir, f"{run_dir}/checkpoints/{tag}")


def load_text_tokenizer(directory: str | Path) -> TextTokenizer:
    """``tokenizer.json`` plus the BOS/EOS named in ``tokenizer_config.json`` (this project's and
    transformers' layout alike)."""
    directory = Path(directory)
    files = [directory / "tokenizer.json", directory / "tokenizer_config.json"]
    for file in files:
        if not file.is_file():
            raise ConfigError(f"{file}: missing (a tokenizer directory needs tokenizer.json and tokenizer_config.json)")
    tokenizer = Tokenizer.from_file(str(files[0]))
    config = json.loads(files[1].read_text())

    def token_id(key: str) -> int:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        token = tokenizer.token_to_id(text) if isinstance(text, str) else None
        if token is None:
            raise ConfigError(f"{files[1]}: {key} {text!r} is not a token of {files[0]}")
        return token

    return TextTokenizer(tokenizer, token_id("bos_token"), token_id("eos_token"))


def load_model_and_tokenizer(model_path: str | Path, tokenizer_dir: str | Path | None) -> tuple[LoadedModel, TextTokenizer]:
    """``--model`` and ``--tokenizer`` of the entry points: a HF directory needs the tokenizer named."""
    loaded = load_model(model_path)
    directory = tokenizer_dir or loaded.tokenizer_dir
    if directory is None:
        raise ConfigError(f"{model_path}: a HF directory needs --tokenizer DIR")
    return loaded, load_text_tokenizer(directory)
