"""Where the evaluation and inference entry points, ``--init-from`` and conversion take weights from:
a run directory (its latest checkpoint), one checkpoint directory (``RUN_DIR/checkpoints/stepN``)
or a HF DeepseekV3 directory (``config.json`` + safetensors; BF16/FP32 or DeepSeek's FP8 release
format). Every reader fills a model built on the ``meta`` device and allocated once, reading only
the tensors that model holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launch.config.run_config import load_run_config
from plugins.errors import ConfigError, ProjectError
from plugins.interop.hf import load_hf_checkpoint, load_hf_weights
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.init import materialize
from tokenizer.load import TokenizerBundle, load_tokenizer_dir

from .checkpointer import Checkpointer, is_checkpoint, read_model, verify


@dataclass
class LoadedModel:
    model: DeepSeekV3
    tokenizer_dir: Path | None  # the run's tokenizer (run and checkpoint directories), else None
    run_dir: Path | None
    description: str


@dataclass
class CheckpointSource:
    """A run's checkpoint: its directory, the run it belongs to and the run's model config."""

    directory: Path
    run_dir: Path
    config: ModelConfig
    tokenizer_dir: Path


def find_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointSource:
    """A run dir (its ``latest``, or ``tag``) or a checkpoint dir -> the checkpoint to read."""
    path = Path(path)
    if is_checkpoint(path):
        run_dir, tag = path.parent.parent, path.name
    elif (path / "config.yaml").is_file():
        run_dir = path
        tag = tag or Checkpointer(run_dir).latest_tag()
        if tag is None:
            raise ConfigError(f"{run_dir}: no complete checkpoint (checkpoints/latest is missing)")
    else:
        raise ConfigError(f"{path}: not a run directory (config.yaml), a checkpoint directory "
                          "(files.json) or a HF directory (config.json)")
    directory = run_dir / "checkpoints" / tag
    verify(directory)
    run = load_run_config(run_dir / "config.yaml")
    return CheckpointSource(directory, run_dir, run.model, Path(run.data.tokenizer))


def read_weights(path: str | Path, model: DeepSeekV3, expert_offset: int = 0) -> None:
    """``--init-from``: fill ``model`` (or the part a rank holds) from a run, checkpoint or HF
    directory; the architecture must match (the rope scaling may differ)."""
    path = Path(path)
    try:
        if (path / "config.json").is_file():
            missing = load_hf_weights(path, model, expert_offset)
            if missing:
                raise ConfigError(f"lacks {len(missing)} of this model's tensors, e.g. {sorted(missing)[0]}")
        else:
            read_model(find_checkpoint(path).directory, model, model.config.n_routed_experts, expert_offset)
    except ProjectError as error:
        raise ConfigError(f"--init-from {path}: its weights do not fit this config's model ({error})") from None


def load_model(path: str | Path, ema: bool = False) -> LoadedModel:
    """A run dir, a checkpoint dir or a HF dir -> the whole model in eval mode, float32, on the GPU
    when there is one; ``ema``: a checkpoint's EMA of the weights (``train.ema``)."""
    path = Path(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (path / "config.json").is_file():
        if ema:
            raise ConfigError(f"{path}: --ema reads a run's checkpoint; a HF directory holds one set of weights")
        return LoadedModel(load_hf_checkpoint(path).to(device).eval(), None, None, f"HF checkpoint {path}")
    source = find_checkpoint(path)
    with torch.device("meta"):
        model = DeepSeekV3(source.config)
    materialize(model, device, std=None)
    read_model(source.directory, model, source.config.n_routed_experts, weights="ema" if ema else "model")
    return LoadedModel(model.eval(), source.tokenizer_dir, source.run_dir,
                       f"{source.directory}{' (EMA)' if ema else ''}")


def load_model_and_tokenizer(model_path: str | Path, tokenizer_dir: str | Path | None, ema: bool = False
                             ) -> tuple[LoadedModel, TokenizerBundle]:
    """``--model`` and ``--tokenizer`` of the entry points: a HF directory needs the tokenizer named."""
    loaded = load_model(model_path, ema)
    directory = tokenizer_dir or loaded.tokenizer_dir
    if directory is None:
        raise ConfigError(f"{model_path}: a HF directory needs --tokenizer DIR")
    return loaded, load_tokenizer_dir(directory)
