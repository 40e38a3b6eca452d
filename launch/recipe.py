"""The run recipe: the ``data:`` and ``train:`` sections of a config YAML (the ``model:`` section
is ``plugins.config.ModelConfig``), with ``--set section.key=value`` overrides.

Every schedule is token-based as in the report (4.2 "Training Hyper-Parameters"); the 671B
config carries the report's numbers, the tiny one the same shape scaled down.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from plugins.config import ConfigError, ModelConfig
from plugins.precision import DEFAULT_FP8_MODULES, FP8_BACKENDS


@dataclass
class LRSchedule:
    """Linear warm-up over ``warmup_steps``; ``peak`` until ``constant_tokens``; cosine to
    ``cosine_final`` over ``cosine_tokens``; held for ``hold_tokens``; then ``final``."""

    peak: float = 2.2e-4
    warmup_steps: int = 2000
    constant_tokens: float = 10.0e12
    cosine_tokens: float = 4.3e12
    cosine_final: float = 2.2e-5
    hold_tokens: float = 333e9
    final: float = 7.3e-6


@dataclass
class BatchSchedule:
    """Global batch in sequences, ramped from ``start`` to ``final`` over ``ramp_tokens``."""

    start: int = 3072
    final: int = 15360
    ramp_tokens: float = 469e9


@dataclass
class StepSchedule:
    """A value that switches to ``then`` once ``until_tokens`` have been trained on."""

    value: float
    until_tokens: float
    then: float


@dataclass
class DataConfig:
    dataset: str = "data/packed"
    tokenizer: str = "data/tokenizer"
    builtin_corpus: bool = False  # build tokenizer and dataset from Python's own text when missing
    seq_len: int = 4096
    builtin_megabytes: int = 8


@dataclass
class TrainConfig:
    total_tokens: float = 14.8e12
    micro_batch_size: int = 1
    lr: LRSchedule = field(default_factory=LRSchedule)
    batch: BatchSchedule = field(default_factory=BatchSchedule)
    bias_update_speed: StepSchedule = field(default_factory=lambda: StepSchedule(0.001, 14.3e12, 0.0))
    mtp_weight: StepSchedule = field(default_factory=lambda: StepSchedule(0.3, 10.0e12, 0.1))
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_interval: int = 1
    save_interval: int = 1000
    heatmap_interval: int = 50
    wandb_project: str = "deepseek-pretrain"
    wandb_mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; or online/offline/disabled
    fp8: str = "none"  # none, emulated, te or auto (report 3.3); --fp8 overrides it
    fp8_modules: list[str] = field(default_factory=lambda: list(DEFAULT_FP8_MODULES))  # module-name patterns
    fp8_power_of_two_scales: bool = True  # scales rounded up to powers of two, as TE's block-scaling recipe


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}


def _build(cls, raw: Any, where: str, source: str):
    """A dataclass from a mapping: unknown keys and wrong types are one-line errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: {where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        kind = known[key].type
        nested = {"LRSchedule": LRSchedule, "BatchSchedule": BatchSchedule, "StepSchedule": StepSchedule}.get(kind)
        if nested is not None:
            value = _build(nested, value, f"{where}.{key}", source)
        elif kind == "list[str]":
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{source}: {where}.{key}: expected a non-empty list of strings, got {value!r}")
        elif kind == "tuple[float, float]":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ConfigError(f"{source}: {where}.{key}: expected two numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        else:
            value = _coerce(value, kind, f"{where}.{key}", source)
        values[key] = value
    return cls(**values)


def _as_number(value: Any) -> Any:
    """PyYAML reads ``14.8e12`` (no sign in the exponent) as a string; take it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, kind: str, where: str, source: str) -> Any:
    if kind == "float":
        value = _as_number(value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{source}: {where}: expected {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def _validate(run: RunConfig) -> None:
    src, t, d = run.source, run.train, run.data

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{src}: {key}: {message}")

    for key in ["micro_batch_size", "log_interval", "save_interval", "heatmap_interval"]:
        if getattr(t, key) <= 0:
            fail(f"train.{key}", "must be positive")
    if t.total_tokens <= 0:
        fail("train.total_tokens", "must be positive")
    if not 0 < t.batch.start <= t.batch.final:
        fail("train.batch.start", f"expected 0 < start <= final, got {t.batch.start} and {t.batch.final}")
    if t.lr.peak <= 0 or t.lr.warmup_steps < 0:
        fail("train.lr", "peak must be positive and warmup_steps non-negative")
    if t.wandb_mode not in ("auto", "online", "offline", "disabled"):
        fail("train.wandb_mode", f"expected auto, online, offline or disabled, got {t.wandb_mode!r}")
    if t.fp8 not in FP8_BACKENDS:
        fail("train.fp8", f"expected one of {', '.join(FP8_BACKENDS)}, got {t.fp8!r}")
    if d.seq_len < 2:
        fail("data.seq_len", "must be at least 2")
    if d.seq_len > run.model.max_position_embeddings:
        fail("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings={run.model.max_position_embeddings}")


def apply_overrides(document: dict, overrides: list[str], source: str) -> dict:
    """``section.key.sub=value`` (value parsed as YAML) into the raw document."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = document
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {key} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return document


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({getattr(error, 'problem', error)})") from None
    document = apply_overrides(document, overrides or [], str(path))
    unknown = set(document) - {"model", "data", "train"}
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown section (expected model, data, train)")
    if "model" not in document:
        raise ConfigError(f"{path}: expected a top-level 'model:' section")
    run = RunConfig(
        model=ModelConfig.from_dict(document["model"], source=str(path)),
        data=_build(DataConfig, document.get("data", {}), "data", str(path)),
        train=_build(TrainConfig, document.get("train", {}), "train", str(path)),
        source=str(path),
    )
    _validate(run)
    return run
