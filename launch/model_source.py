"""Where the evaluation and inference entry points take a model and its tokenizer from: a run
directory (its latest checkpoint), one checkpoint directory (``RUN_DIR/checkpoints/stepN``) or a
HF DeepseekV3 directory (``config.json`` + safetensors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plugins.errors import ConfigError
from plugins.interop.hf import load_hf_checkpoint
from plugins.model.deepseek_v3 import DeepSeekV3
from tokenizer.load import TokenizerBundle, load_tokenizer_dir


@dataclass
class LoadedModel:
    model: DeepSeekV3
    tokenizer_dir: Path | None  # the run's tokenizer (run and checkpoint directories), else None
    run_dir: Path | None
    description: str


def load_model(path: str | Path) -> LoadedModel:
    """A run dir, a checkpoint dir or a HF dir -> the model in eval mode, float32, on the GPU when
    there is one."""
    from .checkpoint import is_checkpoint
    from .config import load_run_config
    from .convert import load_checkpoint_model

    path = Path(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (path / "config.json").is_file():
        return LoadedModel(load_hf_checkpoint(path).to(device).eval(), None, None, f"HF checkpoint {path}")
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


def load_model_and_tokenizer(model_path: str | Path, tokenizer_dir: str | Path | None
                             ) -> tuple[LoadedModel, TokenizerBundle]:
    """``--model`` and ``--tokenizer`` of the entry points: a HF directory needs the tokenizer named."""
    loaded = load_model(model_path)
    directory = tokenizer_dir or loaded.tokenizer_dir
    if directory is None:
        raise ConfigError(f"{model_path}: a HF directory needs --tokenizer DIR")
    return loaded, load_tokenizer_dir(directory)
