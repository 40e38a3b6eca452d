"""Layout-independent initialisation and rank-local construction: whatever part of the model a rank
builds (pipeline stages, a slice of the experts), its values are bit for bit the whole model's, and
what it holds is what the layout's counts say."""

from __future__ import annotations

import pytest
import torch

from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.init import materialize
from plugins.parallel.rank_share import rank_model, rank_parameters


@pytest.fixture
def deep_config(tiny_config) -> ModelConfig:
    """The tiny model with 8 blocks, so up to 8 pipeline stages have one each."""
    return ModelConfig.from_dict({**tiny_config.to_dict(), "num_hidden_layers": 8}, source="test")


def _whole(config, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)  # must not matter: the values come from (seed, name)
    model = DeepSeekV3(config)
    model.reset_parameters(seed)
    return model.state_dict()


@pytest.mark.parametrize("pp,ep,schedule", [(2, 4, "dualpipe"), (4, 2, "1f1b"), (1, 16, "dualpipe"), (4, 1, "dualpipev")])
def test_every_rank_part_equals_the_whole_models_values(deep_config, pp, ep, schedule):
    whole = _whole(deep_config, seed=7)
    local = deep_config.n_routed_experts // ep
    seen = set()
    for pipeline_rank in range(pp):
        for ep_rank in range(ep):
            part = rank_model(deep_config, pp, ep, schedule, pipeline_rank, ep_rank)
            materialize(part, "cpu", deep_config.initializer_range, seed=7, expert_offset=ep_rank * local)
            for name, value in part.state_dict().items():
                reference = whole[name]
                if value.shape != reference.shape:  # an expert bank: this rank's rows
                    reference = reference[ep_rank * local:(ep_rank + 1) * local]
                assert torch.equal(value, reference), (pp, ep, pipeline_rank, ep_rank, name)
                seen.add(name)
    assert seen == set(whole)  # the ranks together hold the whole model


def test_seed_and_name_decide_the_values(tiny_config):
    a, b, c = _whole(tiny_config, 1), _whole(tiny_config, 1), _whole(tiny_config, 2)
    name = "layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert not torch.equal(a[name][0], a[name][1])  # experts differ from each other
    weights = a["layers.0.self_attn.q_b_proj.weight"]
    assert abs(weights.std().item() - tiny_config.initializer_range) < 0.1 * tiny_config.initializer_range
    assert torch.equal(a["layers.0.input_layernorm.weight"], torch.ones_like(a["layers.0.input_layernorm.weight"]))


def test_rank_parameter_counts_add_up_to_the_model(deep_config):
    whole = dict(DeepSeekV3(deep_config).named_parameters())
    experts = sum(p.numel() for n, p in whole.items() if ".mlp.experts." in n)
    others = sum(p.numel() for p in whole.values()) - experts
    embedding = whole["embed_tokens.weight"].numel()  # the last stage's MTP needs it too
    ep = 4
    one_f_one_b = rank_parameters(deep_config, 4, ep, "1f1b")
    assert sum(r["routed_expert_parameters"] for r in one_f_one_b) * ep == experts
    assert sum(r["other_parameters"] for r in one_f_one_b) == others + embedding
    dualpipe = rank_parameters(deep_config, 4, ep, "dualpipe")  # report 3.2.1: two copies of the parameters
    assert sum(r["routed_expert_parameters"] for r in dualpipe) * ep == 2 * experts
    assert sum(r["other_parameters"] for r in dualpipe) == 2 * others


def test_count_cli_gives_the_most_loaded_ranks_parameters(capsys):
    import json

    from plugins.model.__main__ import main

    from .conftest import ROOT

    tiny_yaml = str(ROOT / "configs" / "tiny.yaml")
    assert main(["count", tiny_yaml, "--pp", "2", "--ep", "4", "--pipeline-schedule", "1f1b"]) == 0
    per_rank = json.loads(capsys.readouterr().out)["per_rank"]
    tiny = ModelConfig.from_yaml(tiny_yaml)
    assert per_rank["parameters"] == max(r["parameters"] for r in rank_parameters(tiny, 2, 4, "1f1b"))
    assert per_rank["layout"] == {"pp": 2, "ep": 4, "pipeline_schedule": "1f1b"}
    assert main(["count", tiny_yaml, "--pp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pp 3 --pipeline-schedule dualpipe: dualpipe: needs an even number" in err[0]
