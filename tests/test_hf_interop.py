"""transformers' DeepseekV3 is the oracle: same weights, same float32 logits."""

import json
import shutil
import warnings

import pytest
import torch

from plugins.atomic import OutputDirError
from plugins.errors import ConfigError
from plugins.interop.hf import load_hf_checkpoint, save_hf_checkpoint
from plugins.model.deepseek_v3 import DeepSeekV3


def _load(directory) -> DeepSeekV3:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_hf_checkpoint(directory).eval()


def _hf_load(directory):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 160, (2, 48), generator=torch.Generator().manual_seed(1))


def test_from_hf_matches_transformers_logits(hf_checkpoint, ids):
    directory, reference = hf_checkpoint
    ours = _load(directory)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids).logits
    assert (expected - got).abs().max().item() <= 1e-4
    # The router bias must have arrived: zeroing it changes the routing and the logits.
    for moe in ours.moe_layers():
        moe.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        assert (ours(ids).logits - expected).abs().max().item() > 1e-3


def test_checkpoint_without_mtp_layers_gets_fresh_mtp_modules(hf_checkpoint):
    with pytest.warns(UserWarning, match="no MTP layers"):
        model = load_hf_checkpoint(hf_checkpoint[0])
    eh = model.mtp[0].eh_proj.weight
    assert torch.isfinite(eh).all() and eh.std() > 0


def test_to_hf_loads_in_transformers_and_round_trips(hf_checkpoint, ids, tmp_path):
    ours = _load(hf_checkpoint[0])
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    save_hf_checkpoint(ours, tmp_path / "export", max_shard_bytes=64 * 1024)  # force several shards
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    mtp_layer = ours.config.num_hidden_layers
    for key in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                "mlp.experts.7.down_proj.weight"]:
        assert f"model.layers.{mtp_layer}.{key}" in index["weight_map"]

    reference = _hf_load(tmp_path / "export")
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4

    again = _load(tmp_path / "export")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_to_hf_refuses_a_non_empty_directory(tiny_config, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(OutputDirError, match="not empty"):
        save_hf_checkpoint(DeepSeekV3(tiny_config), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_from_hf_rejects_a_mismatched_checkpoint(hf_checkpoint, tmp_path):
    directory = hf_checkpoint[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"] = 32
    (bad / "config.json").write_text(json.dumps(config))
    for f in directory.glob("*.safetensors"):
        (bad / f.name).symlink_to(f)
    with pytest.raises(ConfigError, match="does not match the config"):
        load_hf_checkpoint(bad)
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf_checkpoint(tmp_path)


def test_a_truncated_safetensors_shard_is_one_line_naming_it(hf_checkpoint, tmp_path):
    directory = hf_checkpoint[0]
    damaged = tmp_path / "damaged"
    shutil.copytree(directory, damaged)
    shard = sorted(damaged.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=f"{shard.name}: unreadable safetensors file"):
        load_hf_checkpoint(damaged)


def test_bf16_load_keeps_router_bias_in_float32(hf_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_hf_checkpoint(hf_checkpoint[0], dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in model.moe_layers())
