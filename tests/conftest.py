import warnings
from pathlib import Path

import pytest
import torch

from plugins.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Everything that trains through the launcher (the ``embedded_run`` fixture, directly or through
    another fixture) is slow; so are the modules that mark themselves (several gloo ranks)."""
    for item in items:
        if "embedded_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml")


def hf_reference_config(**overrides):
    """A small random transformers DeepseekV3Config exercising YaRN (both mscales), groups,
    several shared experts and q/kv compression; transformers is the oracle for the forward pass."""
    from transformers import DeepseekV3Config

    kwargs = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, n_group=4,
        topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, max_position_embeddings=256,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.7},
        rope_theta=10000.0, rope_interleave=True, norm_topk_prob=True, tie_word_embeddings=False,
        initializer_range=0.1, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(directory, transformers model): a saved random DeepseekV3ForCausalLM with perturbed norms
    and a non-zero router bias."""
    model = random_hf_model()
    return save_hf(model, tmp_path_factory.mktemp("hf") / "checkpoint"), model


def random_hf_model(**overrides):
    """A transformers DeepseekV3ForCausalLM (``hf_reference_config(**overrides)``, seed 0) whose norms
    are perturbed and router bias non-zero, so a loader that drops either shows in the logits."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_reference_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


def save_hf(model, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (vocab 1024) trained once on standard-library code and documentation."""
    from tokenizer.train import main

    from .corpus import code_documents, prose_documents, write_jsonl

    directory = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(directory / "corpus.jsonl", code_documents(limit=60) + prose_documents())
    assert main(["--input", str(corpus), "--vocab-size", "1024", "--output", str(directory / "tok")]) == 0
    return directory / "tok"


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory):
    """The README's main job on a fresh machine: the tiny config builds its own tokenizer and
    dataset from Python's standard library, then trains (1 rank, 40 steps, validating on its held-out
    code and docs at steps 20 and 40). Returns (run dir,
    {"dataset", "tokenizer"}, the launcher's CompletedProcess)."""
    from .launcher import launch, ok

    root = tmp_path_factory.mktemp("embedded")
    data = {"dataset": root / "cache" / "packed", "tokenizer": root / "cache" / "tokenizer",
            "validation": {domain: root / "cache" / "val" / domain for domain in ("code", "docs")}}
    result = ok(launch(1, root / "run", "--steps", "40", "--set", f"data.dataset={data['dataset']}",
                       "--set", f"data.tokenizer={data['tokenizer']}", "--set", "data.builtin_megabytes=2",
                       "--set", f"data.validation.code={data['validation']['code']}",
                       "--set", f"data.validation.docs={data['validation']['docs']}",
                       "--set", "train.eval_interval=20", "--set", "train.eval_sequences=16"))
    return root / "run", data, result
