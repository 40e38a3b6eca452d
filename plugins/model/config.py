"""Model configuration: field names follow HF ``DeepseekV3Config`` (ARCHITECTURE.md, "Contracts").

A YAML file under ``configs/`` holds the model in its ``model:`` section, read by the one config
loader (``plugins.config_tree``); the other sections belong to the launcher. Every error is one
line naming the file and key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_tree import build, read_document
from ..errors import ConfigError
from .balance import BALANCE

__all__ = ["ConfigError", "ModelConfig", "YarnScaling"]


@dataclass
class YarnScaling:
    """YaRN context extension (report 4.3): factor s, original window, ramp betas and mscales, as
    transformers reads them: ``attention_factor`` (the cos/sin scale) when given replaces the one
    derived from the mscales; a 0 mscale is one not given; ``truncate`` rounds the ramp's ends."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """DeepSeek-V3 shape (report 4.2) plus the two loss weights the model applies itself and the
    load-balancing strategy (``balance``: training only, see ``plugins.model.balance.BALANCE``)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    aux_loss_alpha: float = 1e-4
    balance: str = "aux_free"  # aux_free | seq_aux | batch_aux | none
    mtp_loss_weight: float = 0.3
    source: str = field(default="<dict>", repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ----------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def num_moe_layers(self) -> int:
        """DeepSeekMoE blocks of the model, MTP blocks included: rows of the expert-load matrix."""
        return self.num_hidden_layers + self.num_nextn_predict_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers from ``first_k_dense_replace`` on (MTP blocks included) use DeepSeekMoE."""
        return layer_idx >= self.first_k_dense_replace

    # -------------------------------------------------------------- validation
    def _fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.source}: model.{key}: {message}")

    def _validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "max_position_embeddings",
        ]
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self._fail(key, f"expected a positive integer, got {value!r}")
        for key in ["n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"]:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._fail(key, f"expected a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            self._fail("q_lora_rank", f"expected a positive integer or null, got {self.q_lora_rank!r}")
        for key in ["routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range"]:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                self._fail(key, f"expected a positive number, got {value!r}")
        for key in ["aux_loss_alpha", "mtp_loss_weight"]:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                self._fail(key, f"expected a non-negative number, got {value!r}")
        if self.balance not in BALANCE:
            self._fail("balance", f"expected one of {', '.join(BALANCE)}, got {self.balance!r}")
        if self.qk_rope_head_dim % 2:
            self._fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            self._fail("n_group", f"{self.n_group} groups do not divide n_routed_experts={self.n_routed_experts}")
        if self.experts_per_group < 2:
            self._fail("n_group", f"each group needs >= 2 experts (group score sums the top-2), got {self.experts_per_group}")
        if self.topk_group > self.n_group:
            self._fail("topk_group", f"{self.topk_group} kept groups exceed n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            self._fail(
                "num_experts_per_tok",
                f"{self.num_experts_per_tok} experts cannot be chosen from {self.topk_group} groups "
                f"of {self.experts_per_group}",
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            self._fail("first_k_dense_replace", f"exceeds num_hidden_layers={self.num_hidden_layers}")
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"]:
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                self._fail(key, f"expected a token id in [0, {self.vocab_size}) or null, got {value!r}")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            if not s.factor >= 1:
                self._fail("rope_scaling.factor", f"expected >= 1, got {s.factor}")
            if s.original_max_position_embeddings <= 0:
                self._fail("rope_scaling.original_max_position_embeddings", "expected a positive integer")
            if not s.beta_fast >= s.beta_slow > 0:  # equal: Kimi-K2's; the ramp then spans one dimension
                self._fail("rope_scaling.beta_fast", f"expected beta_fast >= beta_slow > 0, got {s.beta_fast}, {s.beta_slow}")
            for key in ("mscale", "mscale_all_dim"):
                if getattr(s, key) < 0:
                    self._fail(f"rope_scaling.{key}", f"expected >= 0 (0: not given), got {getattr(s, key)}")
            if s.attention_factor is not None and not s.attention_factor > 0:
                self._fail("rope_scaling.attention_factor", f"expected a positive number or null, got {s.attention_factor}")

    # ------------------------------------------------------------------- input
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Build from a mapping (the ``model:`` section) with the config tree's rules: unknown keys
        and wrong types are one-line errors naming ``model.<key>``."""
        if isinstance(raw, dict) and isinstance(raw.get("rope_scaling"), dict):
            raw = {**raw, "rope_scaling": _yarn_fields(raw["rope_scaling"], source)}
        return build(cls, raw, "model", source, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
        """The ``model:`` section of a config file (``base:`` inheritance and ``--set`` applied)."""
        document = read_document(path, overrides)
        if "model" not in document:
            raise ConfigError(f"{path}: expected a top-level 'model:' section")
        return cls.from_dict(document["model"], source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = {"type": "yarn", **out["rope_scaling"]}
        return out


def _yarn_fields(raw: dict, source: str) -> dict:
    """``rope_scaling`` as written in YAML or HF configs: ``type``/``rope_type`` must be yarn."""
    raw = dict(raw)
    kind = raw.pop("type", raw.pop("rope_type", "yarn"))
    if kind != "yarn":
        raise ConfigError(f"{source}: model.rope_scaling.type: only 'yarn' is supported, got {kind!r}")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in raw:
            raise ConfigError(f"{source}: model.rope_scaling.{key}: required for YaRN")
    return raw
