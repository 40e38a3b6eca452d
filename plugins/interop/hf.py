"""Conversion to and from HF DeepseekV3 checkpoints (config.json + safetensors shards).

Key layout is DeepSeek's published one: ``model.layers.{i}.*`` with per-expert
``mlp.experts.{e}.{gate,up,down}_proj.weight`` and the router bias ``e_score_correction_bias``;
MTP module d lives at layer index ``num_hidden_layers + d`` with ``enorm``, ``hnorm``,
``eh_proj``, ``shared_head.norm`` and copies of the shared ``embed_tokens``/``shared_head.head``.
Both directions stream one tensor (reading) or one shard (writing) at a time, so a host needs
the model's memory plus a shard, never two copies of the model. Either direction also speaks
DeepSeek's FP8 release format (``fp8_release``), dequantised on reading, quantised on writing.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..atomic import check_output_dir, staged_directory
from ..errors import ConfigError
from ..model.balance import reset_expert_loads
from ..model.config import ModelConfig
from ..model.deepseek_v3 import DeepSeekV3
from ..model.init import init_weights
from ..model.rope import RotaryEmbedding
from .fp8_release import (
    QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    check_quantization_config,
    check_tensors,
    dequantize,
    release_tensors,
)

_CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "num_nextn_predict_layers",
    "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "aux_loss_alpha", "mtp_loss_weight",
]
_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ------------------------------------------------------------------ config
ARCHITECTURE = "DeepseekV3ForCausalLM"
# Fields a config.json may set that do not change the model: bookkeeping, inference switches
# (``ep_size``: DeepSeek's inference expert parallelism) and the original run's balance loss choice.
_IGNORED_FIELDS = {"architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
                   "use_cache", "_name_or_path", "output_router_logits", "ep_size", "seq_aux", "quantization_config"}
# Fields this model implements with one value only.
_FIXED_FIELDS = {"hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc", "attention_bias": False,
                 "mlp_bias": False, "attention_dropout": 0.0, "moe_layer_freq": 1, "pretraining_tp": 1,
                 "rope_interleave": True}
_ROPE_FIELDS = {"rope_scaling", "rope_parameters", "rope_theta", "num_mtp_layers"}
# Fields transformers writes that follow from the others: this model has one key-value head per head.
_DERIVED_FIELDS = {
    "num_key_value_heads": lambda c: c.num_attention_heads,
    "head_dim": lambda c: c.qk_rope_head_dim,
    "qk_head_dim": lambda c: c.qk_nope_head_dim + c.qk_rope_head_dim,
}
_KNOWN_FIELDS = _IGNORED_FIELDS | _FIXED_FIELDS.keys() | _ROPE_FIELDS | set(_CONFIG_FIELDS) | _DERIVED_FIELDS.keys()


def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """ModelConfig from a HF/DeepSeek config.json (``rope_scaling``+``rope_theta`` or ``rope_parameters``):
    model_type ``deepseek_v3``, or any model_type whose ``architectures`` is DeepseekV3ForCausalLM
    (Kimi-K2's ``kimi_k2``) as long as every field it sets is one this model implements. The one
    reader of config.json: evaluation, conversion, generation and ``--init-from`` all come here."""
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        raise ConfigError(f"{source}: architectures: expected a list of class names, got {architectures!r}")
    if raw.get("model_type", "deepseek_v3") != "deepseek_v3" and ARCHITECTURE not in architectures:
        raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} with architectures "
                          f"{raw.get('architectures')!r}: expected model_type 'deepseek_v3' or architectures "
                          f"[{ARCHITECTURE!r}]")
    check_quantization_config(raw, source)
    for key, value in raw.items():
        if key not in _KNOWN_FIELDS:
            raise ConfigError(f"{source}: {key}: not a field this model implements ({ARCHITECTURE} as built here)")
        if key in _FIXED_FIELDS and value != _FIXED_FIELDS[key]:
            raise ConfigError(f"{source}: {key}: expected {_FIXED_FIELDS[key]!r} (what this model implements), "
                              f"got {value!r}")
    values = {k: raw[k] for k in _CONFIG_FIELDS if k in raw}
    if "num_nextn_predict_layers" not in values and "num_mtp_layers" in raw:
        values["num_nextn_predict_layers"] = raw["num_mtp_layers"]
    values["rope_theta"], values["rope_scaling"] = _rope_from_hf(raw, source)
    config = ModelConfig.from_dict(values, source=source)
    for key, derive in _DERIVED_FIELDS.items():
        if key in raw and raw[key] != derive(config):
            raise ConfigError(f"{source}: {key}: expected {derive(config)} (what this model implements), got {raw[key]!r}")
    return config


def _rope_from_hf(raw: dict, source: str) -> tuple[object, dict | None]:
    """(rope_theta, rope_scaling as ``ModelConfig.from_dict`` reads it) of a config.json. Every key of
    the YaRN mapping is one the model applies (an unknown one is refused by the config tree); a
    missing ``mscale``/``mscale_all_dim`` is 0, transformers' reading of "not given"."""
    for key in ("rope_parameters", "rope_scaling"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{source}: {key}: expected a mapping or null, got {raw[key]!r}")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        return theta, None
    return theta, {"mscale": 0.0, "mscale_all_dim": 0.0, **rope}


def config_to_hf(config: ModelConfig, dtype: torch.dtype, fp8: bool = False) -> dict:
    """config.json contents that transformers' DeepseekV3Config and DeepSeek's own code both read;
    ``fp8``: with the FP8 release format's ``quantization_config``."""
    out = {"architectures": [ARCHITECTURE], "model_type": "deepseek_v3"}
    out.update({k: getattr(config, k) for k in _CONFIG_FIELDS})
    out.update(
        num_key_value_heads=config.num_attention_heads,
        hidden_act="silu",
        attention_bias=False,
        rope_interleave=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rope_theta=config.rope_theta,
        rope_scaling=None,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if config.rope_scaling is not None:
        out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in vars(config.rope_scaling).items()
                                                  if v is not None and (k, v) != ("truncate", True)}}  # the default
    if fp8:
        out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return out


# -------------------------------------------------------------- key mapping
def _hf_prefix(name: str, config: ModelConfig) -> str:
    """Our parameter name -> HF name (experts still fused)."""
    if name == "lm_head.weight":
        return name
    match = re.match(r"mtp\.(\d+)\.(.*)", name)
    if match is None:
        return "model." + name
    layer = f"model.layers.{config.num_hidden_layers + int(match.group(1))}."
    rest = match.group(2)
    if rest.startswith("block."):
        return layer + rest[len("block."):]
    if rest == "norm.weight":
        return layer + "shared_head.norm.weight"
    return layer + rest


def _our_name(hf_key: str, config: ModelConfig) -> str | None:
    """HF name -> our parameter name (fused experts), or None for the MTP copies of shared tensors."""
    if hf_key == "lm_head.weight":
        return hf_key
    match = re.match(r"model\.layers\.(\d+)\.(.*)", hf_key)
    if match is None:
        return hf_key.removeprefix("model.")
    layer, rest = int(match.group(1)), match.group(2)
    if layer < config.num_hidden_layers:
        return hf_key.removeprefix("model.")
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    depth = layer - config.num_hidden_layers
    if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        return f"mtp.{depth}.{rest}"
    if rest == "shared_head.norm.weight":
        return f"mtp.{depth}.norm.weight"
    return f"mtp.{depth}.block.{rest}"


def hf_tensors(name: str, tensor: torch.Tensor, config: ModelConfig, first_expert: int = 0
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF (key, tensor) pairs of one of our parameters or buffers: expert banks split per expert
    (``tensor`` may hold the experts ``first_expert ..`` of a bank), and the embedding and head also
    as every MTP layer's copies."""
    key = _hf_prefix(name, config)
    if key.endswith("mlp.experts.gate_up_proj"):
        base, half = key[: -len(".gate_up_proj")], tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"{base}.{first_expert + e}.gate_proj.weight", tensor[e, :half]
            yield f"{base}.{first_expert + e}.up_proj.weight", tensor[e, half:]
        return
    if key.endswith("mlp.experts.down_proj"):
        for e in range(tensor.shape[0]):
            yield f"{key[: -len('.down_proj')]}.{first_expert + e}.down_proj.weight", tensor[e]
        return
    yield key, tensor
    copy = {"embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}.get(name)
    for depth in range(config.num_nextn_predict_layers if copy else 0):
        yield f"model.layers.{config.num_hidden_layers + depth}.{copy}", tensor


def iter_hf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs of the whole model, experts split per expert, MTP copies included."""
    for name, tensor in model.state_dict().items():
        yield from hf_tensors(name, tensor.detach(), model.config)


# ------------------------------------------------------------------ loading
def _checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "an object with a weight_map").get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(f, str) and f for f in weight_map.values())):
            raise ConfigError(f"{index}: weight_map: expected a non-empty mapping of tensor names to "
                              f"safetensors file names, got {weight_map!r:.80}")
        return sorted({directory / f for f in weight_map.values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{directory}: no *.safetensors files (expected a HF DeepseekV3 checkpoint directory)")
    return files


def _read_json(path: Path, expected: str) -> dict:
    """A JSON object from ``path``; anything else is one line naming the file."""
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected {expected}, got a JSON {type(document).__name__}")
    return document


def _raw_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{directory}: no config.json (expected a HF DeepseekV3 checkpoint directory)")
    return _read_json(config_path, "a JSON object of config fields")


def read_hf_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    return config_from_hf(_raw_config(directory), source=str(directory / "config.json"))


def _headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Every tensor's file, safetensors dtype and shape, from the files' headers (no tensor read)."""
    out = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    piece = shard.get_slice(key)
                    out[key] = (path, piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{path}: unreadable safetensors file ({error})") from None
    return out


def _reader(shard, path: Path, scales: dict[str, str], headers: dict) -> Callable[[str, torch.device], torch.Tensor]:
    """Reads a tensor of the open ``shard``; an FP8 weight comes dequantised with its block scales
    (from whichever file holds them) on the device of the tensor it fills."""

    def read(key: str, device: torch.device) -> torch.Tensor:
        if key not in scales:
            return shard.get_tensor(key)
        scale_path = headers[scales[key]][0]
        if scale_path == path:
            scale = shard.get_tensor(scales[key])
        else:
            with safe_open(str(scale_path), framework="pt", device="cpu") as other:
                scale = other.get_tensor(scales[key])
        return dequantize(shard.get_tensor(key).to(device), scale.to(device))

    return read


def load_hf_weights(directory: str | Path, model: DeepSeekV3, expert_offset: int = 0) -> set[str]:
    """Fill ``model`` (the whole model, or the stages and routed experts ``expert_offset ..`` one rank
    holds) from a HF checkpoint dir, BF16/FP32 or DeepSeek's FP8 release format (``fp8_release``:
    dequantised into the model's dtype), reading only the tensors it holds, one at a time. Returns
    the names of the held tensors the checkpoint lacks."""
    directory = Path(directory)
    config_path = directory / "config.json"
    raw = _raw_config(directory)
    config_from_hf(raw, str(config_path))  # the one reader: a foreign or unsupported config is refused here too
    fp8 = check_quantization_config(raw, str(config_path))
    with torch.device("meta"):
        known = set(DeepSeekV3(model.config).state_dict())
    files = _checkpoint_files(directory)
    headers = _headers(files)
    scales = check_tensors(headers, fp8, config_path)
    loader = _ShardLoader(model.state_dict(), model.config, known, expert_offset)
    for path in tqdm(files, desc="loading shards", unit="shard", disable=None):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                read = _reader(shard, path, scales, headers)
                for key in shard.keys():
                    if not key.endswith(SCALE_SUFFIX):  # read with its weight
                        loader.load(key, read, path)
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{path}: unreadable safetensors file ({error})") from None
    missing = loader.missing()
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    return missing


def load_hf_checkpoint(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build ``DeepSeekV3`` from a HF checkpoint dir. Weights are allocated once (uninitialised) and
    filled tensor by tensor from the shards. A checkpoint without MTP layers gets fresh MTP modules."""
    config = read_hf_config(directory)
    with torch.device("meta"):
        model = DeepSeekV3(config)
        if dtype is not None:
            model.to(dtype)
            for moe in model.moe_layers():
                moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    model.to_empty(device=device)
    model.rotary = RotaryEmbedding(config).to(device)
    reset_expert_loads(model.moe_layers())  # to_empty left them uninitialised
    missing = load_hf_weights(directory, model)
    mtp_missing = {k for k in missing if k.startswith("mtp.")}
    if mtp_missing and mtp_missing == {k for k in model.state_dict() if k.startswith("mtp.")}:
        warnings.warn(f"{directory}: checkpoint has no MTP layers; MTP modules are freshly initialised", stacklevel=2)
        init_weights(model.mtp, config.initializer_range, prefix="mtp.")
        missing -= mtp_missing
    if missing:
        raise ConfigError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {_hf_prefix(sorted(missing)[0], config)}")
    return model


class _ShardLoader:
    """Copies checkpoint tensors into the model's state-dict tensors and tracks what was filled;
    a fused expert tensor counts as filled once every held expert's every part has arrived. A key
    of the config's model that this (partial) model does not hold is skipped unread."""

    def __init__(self, targets: dict[str, torch.Tensor], config: ModelConfig, known: set[str], expert_offset: int):
        self.targets, self.config, self.known, self.expert_offset = targets, config, known, expert_offset
        self.filled: set[str] = set()
        self.expert_parts: dict[str, set[tuple[int, str]]] = {}

    def missing(self) -> set[str]:
        complete = {
            name
            for name, parts in self.expert_parts.items()
            if len(parts) == self.targets[name].shape[0] * (1 if name.endswith("down_proj") else 2)
        }
        return set(self.targets) - self.filled - complete

    def load(self, key: str, read: Callable[[str, torch.device], torch.Tensor], path: Path) -> None:
        expert = _EXPERT_KEY.match(key)
        if expert:
            base, e, proj = expert.group(1), int(expert.group(2)), expert.group(3)
            name = _our_name(f"{base}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}", self.config)
            if name not in self.known or e >= self.config.n_routed_experts:
                raise ConfigError(f"{path}: {key}: no such expert in the config")
            target, e = self.targets.get(name), e - self.expert_offset
            if target is None or not 0 <= e < target.shape[0]:
                return
            rows = target.shape[1] // 2
            view = {"gate_proj": target[e, :rows], "up_proj": target[e, rows:], "down_proj": target[e]}[proj]
            _copy(view, read(key, view.device), key, path)
            self.expert_parts.setdefault(name, set()).add((e, proj))
            return
        name = _our_name(key, self.config)
        if name is None:
            return
        if name not in self.known:
            raise ConfigError(f"{path}: {key}: unexpected tensor for this config")
        if name not in self.targets:
            return
        _copy(self.targets[name], read(key, self.targets[name].device), key, path)
        self.filled.add(name)


def _copy(target: torch.Tensor, source: torch.Tensor, key: str, path: Path) -> None:
    if target.shape != source.shape:
        raise ConfigError(f"{path}: {key}: shape {tuple(source.shape)} does not match the config's {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(source)


# ------------------------------------------------------------------ saving
def save_hf_checkpoint(model, directory: str | Path, max_shard_bytes: int = 5 * 2**30, fp8: bool = False) -> Path:
    """Write the whole ``model`` to ``directory`` (must not exist or be empty); it appears only once
    complete. ``fp8``: in DeepSeek's FP8 release format."""
    return write_hf_directory(model.config, model.embed_tokens.weight.dtype, iter_hf_tensors(model), directory,
                              max_shard_bytes, fp8)


def write_hf_directory(config: ModelConfig, dtype: torch.dtype, tensors: Iterable[tuple[str, torch.Tensor]],
                       directory: str | Path, max_shard_bytes: int = 5 * 2**30, fp8: bool = False) -> Path:
    """Write (HF key, tensor) pairs as safetensors shards + index + config.json, holding at most one
    shard's tensors at a time, so ``tensors`` may be produced on the fly (streamed conversion).
    ``fp8``: DeepSeek's FP8 release format (``fp8_release``), each weight quantised as it arrives and
    kept in one shard with its block scales; ``dtype`` is then the BF16 of the other tensors."""
    directory = Path(directory)
    check_output_dir(directory, overwrite=False, option="HF output directory")
    if fp8:
        dtype = torch.bfloat16
    with staged_directory(directory) as tmp:
        shards: list[list[str]] = []
        pending: dict[str, torch.Tensor] = {}
        pending_bytes = total_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            save_file(pending, str(tmp / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

        for key, tensor in tqdm(tensors, desc="writing HF checkpoint", unit="tensor", disable=None):
            group = list(release_tensors(key, tensor.detach())) if fp8 else [(key, tensor.detach())]
            size = sum(t.numel() * t.element_size() for _, t in group)
            if pending and pending_bytes + size > max_shard_bytes:
                flush()
            for name, value in group:
                pending[name] = value.to("cpu", copy=True).contiguous()
            pending_bytes += size
            total_bytes += size
        if pending:
            flush()
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (tmp / f"part-{i:05d}.safetensors").rename(tmp / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, dtype, fp8), indent=2))
    return directory
