"""``train.compile``: each decoder block through ``torch.compile``. ``torch._dynamo.explain`` finds
no graph break in a dense block, a single-process MoE block or an MTP module, and only the named
all-to-all breaks in an expert-parallel MoE block; compiled equals eager within float rounding."""

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.config.run_config import load_run_config
from launch.training.parallelize import compile_blocks
from plugins.errors import ConfigError
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.parallel.expert import COMPILE_BREAKS, ExpertExchange, apply_expert_parallel

from .conftest import ROOT
from .distributed import STEP_RTOL


def _model(**overrides) -> DeepSeekV3:
    config = ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml", [f"model.{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return DeepSeekV3(config)


def _breaks(module, *inputs) -> list[str]:
    """Each graph break of ``module``'s forward: the expert-parallel dispatcher call it is at
    (``COMPILE_BREAKS``'s key), else dynamo's reason."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*inputs)
    assert explained.graph_break_count >= len(explained.break_reasons)
    return [next((key for key in COMPILE_BREAKS if f"AllToAllDispatcher.{key}" in reason.reason), reason.reason)
            for reason in explained.break_reasons]


def _inputs(model, seq_len=16):
    h = torch.randn(2, seq_len, model.config.hidden_size)
    return h, model.rope(seq_len, h.device)


def test_dense_moe_and_mtp_blocks_compile_without_a_graph_break():
    model = _model()
    h, rope = _inputs(model)
    assert type(model.layers["0"].mlp).__name__ == "SwiGLU" and _breaks(model.layers["0"], h, rope) == []
    assert type(model.layers["1"].mlp).__name__ == "DeepSeekMoE" and _breaks(model.layers["1"], h, rope) == []
    assert _breaks(model.mtp[0], h, torch.randn_like(h), rope) == []
    moe = model.layers["1"].to(torch.bfloat16)  # bf16 weights, as on a GPU: the grouped GEMM's own kernel
    assert _breaks(moe, h.bfloat16(), tuple(t.bfloat16() for t in rope)) == []


def test_an_expert_parallel_moe_block_breaks_only_at_its_named_all_to_alls():
    model = _model()
    h, rope = _inputs(model)
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{Path(directory) / 'store'}", rank=0, world_size=1)
        try:
            apply_expert_parallel(model, ExpertExchange(dist.new_group([0]), model.config.n_routed_experts))
            breaks = _breaks(model.layers["1"], h, rope)
        finally:
            dist.destroy_process_group()
    assert breaks and set(breaks) == set(COMPILE_BREAKS), breaks


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    """Losses and every gradient of one step of the tiny model (dense block, MoE block, MTP), compiled
    (``aot_eager``: the traced graphs and their autograd, without inductor's minutes of C++ builds on CPU)
    against eager; within the rounding of reordered float sums."""
    eager = _model(num_hidden_layers=2)
    compiled = _model(num_hidden_layers=2)
    assert compile_blocks(compiled, backend="aot_eager") == 3
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints see the same names
    ids = torch.randint(0, eager.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    losses = []
    for model in (eager, compiled):
        out = model(ids, labels=ids)
        out.loss.backward()
        losses.append(torch.stack([out.lm_loss, out.mtp_loss, out.aux_loss]))
    torch.testing.assert_close(losses[1], losses[0], rtol=STEP_RTOL, atol=0)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=STEP_RTOL, atol=STEP_RTOL * a.grad.abs().max().item(),
                                   msg=name)
    for a, b in zip(eager.moe_layers(), compiled.moe_layers()):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)


def test_compile_with_recomputation_is_one_line():
    with pytest.raises(ConfigError, match="train.compile: true with train.recompute: selective cannot run"):
        load_run_config(ROOT / "configs" / "tiny.yaml", ["train.compile=true", "train.recompute=selective"])
