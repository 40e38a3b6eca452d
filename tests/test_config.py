import json
import subprocess
import sys

import pytest
import torch

from plugins.errors import ConfigError
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.param_count import count_parameters

from .conftest import ROOT


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3_671b", "ablation_16b"])
def test_shipped_configs_load(name):
    config = ModelConfig.from_yaml(ROOT / "configs" / f"{name}.yaml")
    assert config.n_routed_experts % config.n_group == 0


def test_671b_config_reproduces_the_report():
    config = ModelConfig.from_yaml(ROOT / "configs" / "deepseek_v3_671b.yaml")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (61, 7168, 129280)
    assert (config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank) == (128, 1536, 512)
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (128, 64, 128)
    assert (config.n_shared_experts, config.n_routed_experts, config.num_experts_per_tok) == (1, 256, 8)
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (8, 4, 2.5)
    assert (config.first_k_dense_replace, config.intermediate_size, config.moe_intermediate_size) == (3, 18432, 2048)
    assert (config.initializer_range, config.aux_loss_alpha, config.num_nextn_predict_layers) == (0.006, 1e-4, 1)


def test_count_cli_gives_671b_total_and_37b_activated():
    result = subprocess.run(
        [sys.executable, "-m", "plugins.model", "count", str(ROOT / "configs" / "deepseek_v3_671b.yaml")],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    counts = json.loads(result.stdout)
    assert round(counts["total"] / 1e9, 1) == 671.0
    assert 37.0 <= counts["activated"] / 1e9 <= 37.6
    # The MTP module adds ~11.6B of its own; with the copies of the embedding and head that
    # DeepSeek's published weights store beside it, ~13.5B (the report rounds to 14B).
    assert 11.0 <= counts["mtp"] / 1e9 <= 12.0


def test_ablation_config_is_15_7b():
    counts = count_parameters(ModelConfig.from_yaml(ROOT / "configs" / "ablation_16b.yaml"))
    assert round(counts["total"] / 1e9, 1) == 15.7


def test_count_matches_an_allocated_model(tiny_config):
    model = DeepSeekV3(tiny_config)
    counts = count_parameters(tiny_config)
    assert counts["total"] + counts["mtp"] == sum(p.numel() for p in model.parameters())
    assert counts["mtp"] == sum(p.numel() for p in model.mtp.parameters())


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def _error(tmp_path, model_yaml: str) -> str:
    import yaml

    document = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    document["model"].update(yaml.safe_load(model_yaml))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_yaml(_write(tmp_path, yaml.safe_dump(document)))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "c.yaml") in message
    return message


@pytest.mark.parametrize(
    "override, key",
    [
        ("hidden_sise: 12", "model.hidden_sise: unknown key"),
        ("n_group: 3", "model.n_group"),
        ("topk_group: 5", "model.topk_group"),
        ("num_experts_per_tok: 9", "model.num_experts_per_tok"),
        ("num_attention_heads: 0", "model.num_attention_heads"),
        ("hidden_size: 12.5", "model.hidden_size"),
        ("qk_rope_head_dim: 15", "model.qk_rope_head_dim"),
        ("first_k_dense_replace: 9", "model.first_k_dense_replace"),
        ("rope_scaling: {type: linear, factor: 2}", "model.rope_scaling.type"),
        ("rope_scaling: {factor: 2}", "model.rope_scaling.original_max_position_embeddings"),
    ],
)
def test_bad_fields_are_one_line_errors_naming_the_key(tmp_path, override, key):
    assert key in _error(tmp_path, override)


def test_missing_file_bad_yaml_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        ModelConfig.from_yaml(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="line [0-9]+ invalid YAML"):
        ModelConfig.from_yaml(_write(tmp_path, "model:\n  a: [1\n"))
    with pytest.raises(ConfigError, match="'model:' section"):
        ModelConfig.from_yaml(_write(tmp_path, "train: {}\n"))


def test_count_cli_reports_bad_config_in_one_line(tmp_path):
    path = _write(tmp_path, "model:\n  n_group: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "plugins.model", "count", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model.n_group" in result.stderr


def test_init_std_follows_config(tiny_config):
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config)
    std = model.layers["1"].mlp.experts.gate_up_proj.std().item()
    assert abs(std - tiny_config.initializer_range) < 0.1 * tiny_config.initializer_range


# ------------------------------------------------------------------------- the run config tree
def _run_config(tmp_path, text: str, overrides=()):
    from launch.config.run_config import load_run_config

    return load_run_config(_write(tmp_path, text), list(overrides))


def test_numbers_in_any_yaml_spelling(tmp_path):
    """PyYAML reads ``1e-6`` (no dot) as a string; every section takes it as the number it is."""
    base = (ROOT / "configs" / "tiny.yaml").as_posix()
    run = _run_config(tmp_path, f"base: {base}\nmodel:\n  rms_norm_eps: 1e-6\ntrain:\n  eps: 1e-8\n  total_tokens: 6e5\n"
                                "  batch: {start: 8, final: 16, ramp_tokens: 1e5}\n")
    assert run.model.rms_norm_eps == 1e-6 and run.train.eps == 1e-8 and run.train.batch.ramp_tokens == 1e5
    assert run.train.total_tokens == 6e5 and isinstance(run.train.batch.start, int)


@pytest.mark.parametrize("section, text, key", [
    ("model", "model:\n  hidden_sise: 3", "model.hidden_sise: unknown key"),
    ("data", "data:\n  seqlen: 3", "data.seqlen: unknown key"),
    ("train", "train:\n  lr: {peek: 1.0}", "train.lr.peek: unknown key"),
    ("parallel", "parallel:\n  tp: 2", "parallel.tp: unknown key"),
    ("section", "optimizer: {}", "optimizer: unknown section"),
    ("type", "train:\n  micro_batch_size: four", "train.micro_batch_size: expected an integer, got 'four'"),
    ("type", "train:\n  betas: [0.9]", "train.betas: expected 2 numbers"),
    ("type", "data:\n  builtin_corpus: 1", "data.builtin_corpus: expected true or false"),
    ("value", "parallel:\n  pipeline_schedule: gpipe", "parallel.pipeline_schedule: expected one of dualpipe"),
])
def test_unknown_keys_and_wrong_types_anywhere_are_one_line_errors(tmp_path, section, text, key):
    base = (ROOT / "configs" / "tiny.yaml").as_posix()
    with pytest.raises(ConfigError) as info:
        _run_config(tmp_path, f"base: {base}\n{text}\n")
    assert key in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_base_inherits_and_overrides_key_by_key(tmp_path):
    from launch.config.run_config import load_run_config

    tiny = load_run_config(ROOT / "configs" / "tiny.yaml")
    stage = load_run_config(ROOT / "configs" / "tiny_long_stage2.yaml")  # tiny <- stage 1 <- stage 2
    assert stage.model == tiny.model
    assert (stage.data.seq_len, stage.data.tokenizer, stage.train.micro_batch_size) == (512, tiny.data.tokenizer, 2)
    assert (stage.train.lr.peak, stage.train.heatmap_interval, stage.train.weight_decay) == (1e-4, 10, 0.1)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_run_config(tmp_path / "a.yaml")


def test_set_overrides_and_the_recorded_config_round_trip(tmp_path):
    import yaml

    from launch.config.run_config import load_run_config

    run = load_run_config(ROOT / "configs" / "tiny.yaml", ["parallel.ep=2", "train.lr.peak=1e-3", "model.n_group=2"])
    assert (run.parallel.ep, run.train.lr.peak, run.model.n_group) == (2, 1e-3, 2)
    recorded = _write(tmp_path, yaml.safe_dump(run.to_dict(), sort_keys=False))  # what a run dir's config.yaml holds
    assert load_run_config(recorded).to_dict() == run.to_dict()
    with pytest.raises(ConfigError, match="--set train: expected section.key=value"):
        load_run_config(ROOT / "configs" / "tiny.yaml", ["train"])


def test_partial_and_empty_sections_keep_the_defaults_and_the_base(tmp_path):
    base = (ROOT / "configs" / "tiny.yaml").as_posix()
    run = _run_config(tmp_path, f"base: {base}\nparallel:\ntrain:\n  mtp_weight: {{value: 0.2}}\n",
                      ["train.bias_update_speed.then=0.5"])
    assert (run.train.mtp_weight.value, run.train.mtp_weight.until_tokens) == (0.2, 4.0e5)  # the base's mark
    assert run.train.bias_update_speed.then == 0.5 and run.parallel.pp == 1
    fresh = _run_config(tmp_path, "model: {vocab_size: 512, hidden_size: 64}\ntrain:\n  mtp_weight: {value: 0.2}\n")
    assert (fresh.train.mtp_weight.value, fresh.train.mtp_weight.until_tokens) == (0.2, 10.0e12)  # the default's
    with pytest.raises(ConfigError, match="train.seed: expected an integer"):
        _run_config(tmp_path, f"base: {base}\ntrain:\n  seed: {10**400}\n")


def test_run_dirs_written_before_the_parallel_section_still_load(tmp_path):
    base = (ROOT / "configs" / "tiny.yaml").as_posix()
    run = _run_config(tmp_path, f"base: {base}\ntrain:\n  fp8: emulated\n  fp8_modules: ['*.mlp.*']\n")
    assert (run.parallel.fp8, run.parallel.fp8_modules) == ("emulated", ["*.mlp.*"])
