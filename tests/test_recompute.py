"""Memory recipe (report 3.2.3 and 3.3.1): activation recomputation gives the losses, gradients and
expert loads of storing everything while keeping fewer bytes, also under the pipeline's split
backward; AdamW with BF16 moments keeps FP32 weights and resumes exactly."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from launch.config.run_config import check_recompute, load_run_config
from launch.training.memory import SavedActivations
from plugins.errors import ConfigError
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.losses import take_balance_losses
from plugins.model.recompute import set_recompute
from plugins.precision.moments import AdamW

from .conftest import ROOT
from .launcher import launch, metrics, ok

MODES = ("none", "selective", "full")


def _model(mode: str) -> DeepSeekV3:
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml"), num_hidden_layers=2)
    model = DeepSeekV3(config)
    set_recompute(model, mode)
    return model


def _batches(count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 4096, (2, 48), generator=g) for _ in range(count)]


def _accumulate(mode: str):
    """Three micro-batches of gradient accumulation: (losses, gradients, expert loads, saved bytes of
    the first micro-batch)."""
    model, losses = _model(mode), []
    for index, ids in enumerate(_batches()):
        with SavedActivations(model) as saved:
            out = model(ids, labels=torch.roll(ids, -1, 1))
        if index == 0:
            saved_bytes = saved.bytes()
        (out.loss / 3).backward()
        losses.append(out.loss.item())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return losses, grads, [m.tokens_per_expert.clone() for m in model.moe_layers()], saved_bytes


@pytest.fixture(scope="module")
def accumulated():
    return {mode: _accumulate(mode) for mode in MODES}


def _assert_same_gradients(grads, reference):
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        scale = reference[name].abs().max().clamp_min(1e-12)
        assert ((grad - reference[name]).abs().max() / scale).item() <= 1e-5, name  # float reassociation at most


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_losses_gradients_and_expert_loads_of_storing_everything(accumulated, mode):
    losses, grads, loads, _ = accumulated[mode]
    reference_losses, reference_grads, reference_loads, _ = accumulated["none"]
    assert losses == reference_losses  # the forward is the same ops
    assert grads.keys() == reference_grads.keys()
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)  # bitwise: none's graph
    # each token counted once per block although full recomputes every block's forward in backward
    assert all(torch.equal(a, b) for a, b in zip(loads, reference_loads))
    assert sum(int(load.sum()) for load in loads) == 3 * 2 * 48 * 4 * 2  # micro-batches x tokens x top-4 x 2 blocks


def test_recompute_keeps_fewer_activation_bytes(accumulated):
    saved = {mode: accumulated[mode][3] for mode in MODES}
    assert saved["full"] < saved["selective"] < saved["none"], saved


def test_selective_drops_the_norm_outputs_and_per_head_tensors_of_a_block():
    """Per block, what selective no longer keeps is at least the two norm outputs [B, T, D] and the
    per-head q, k, v [B, T, H, 2 x 48] attention reads (hand count of the tiny shapes, fp32)."""
    ids = _batches(1)[0]
    kept = {}
    for mode in ("none", "selective"):
        model = _model(mode)
        with SavedActivations(model) as saved:
            for name, block in model.layers.items():
                block.register_forward_pre_hook(lambda module, args, name=name: setattr(saved, "label", name))
                block.register_forward_hook(lambda *args: setattr(saved, "label", None))
            model(ids, labels=ids)
        kept[mode] = saved.bytes("0")  # the dense block
    tokens, config = ids.numel(), model.config
    norms = 2 * tokens * config.hidden_size * 4
    heads = 3 * tokens * config.num_attention_heads * config.qk_head_dim * 4
    assert kept["none"] - kept["selective"] >= norms + heads, (kept, norms, heads)


def _split_backward(mode: str, threaded: bool):
    """A pipeline stage's backward as DualPipe splits it: the input gradient (optionally on a second
    thread, as an overlapped F&B runs it), then the deferred weight gradients."""
    model = _model(mode)
    ids = _batches(1)[0]
    hidden = model.embed_tokens(ids).detach().requires_grad_()
    rope = model.rope(ids.shape[1], ids.device)
    out = model.outputs(model.trunk(hidden, rope), ids, rope, torch.roll(ids, -1, 1))
    objective = out.lm_loss + out.mtp_loss + take_balance_losses(model.moe_layers())
    weights = [p for name, p in model.named_parameters() if not name.startswith("embed_tokens")]
    result = {}

    def input_gradient():
        result["groups"] = stage_backward_input([objective], None, [hidden], iter(weights))[1]

    if threaded:
        side = threading.Thread(target=input_gradient)
        side.start()
        side.join()
    else:
        input_gradient()
    input_grad = hidden.grad.clone()
    stage_backward_weight(iter(weights), result["groups"])
    return input_grad, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,threaded", [("selective", False), ("full", False), ("selective", True),
                                           ("full", True)])
def test_pipeline_split_backward_with_recompute_gives_the_gradients_of_none(mode, threaded):
    reference_input, reference = _split_backward("none", False)
    input_grad, grads = _split_backward(mode, threaded)
    assert (input_grad - reference_input).abs().max() <= 1e-5 * reference_input.abs().max()
    _assert_same_gradients(grads, reference)


def test_recompute_config_is_validated_in_one_line(tmp_path):
    config = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"tiny.yaml: train.recompute: expected one of none, selective, full"):
        load_run_config(config, ["train.recompute=some"])
    with pytest.raises(ConfigError, match=r"train.optimizer_moments_dtype: expected one of float32, bfloat16"):
        load_run_config(config, ["train.optimizer_moments_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"train.recompute: full with --pp > 1 and --ep > 1 cannot run"):
        load_run_config(config, ["train.recompute=full", "parallel.pp=2", "parallel.ep=2"])
    with pytest.raises(ConfigError, match=r"tiny.yaml: train.recompute: full with model.balance: batch_aux cannot run"):
        load_run_config(config, ["train.recompute=full", "model.balance=batch_aux"])
    with pytest.raises(ConfigError, match=r"tiny.yaml: train.recompute: selective with --fp8 te cannot run"):
        load_run_config(config, ["train.recompute=selective", "parallel.fp8=te"])  # launch.plan reads it so too
    run = load_run_config(config, ["train.recompute=selective", "parallel.pp=2", "parallel.fp8=auto"])
    check_recompute(run)
    run.parallel.fp8 = "te"  # auto, resolved on a Hopper GPU
    with pytest.raises(ConfigError, match=r"train.recompute: selective with --fp8 te cannot run"):
        check_recompute(run)


@pytest.mark.parametrize("chunk", [AdamW.CHUNK, 7])
def test_bf16_moments_follow_adamw_with_moments_rounded_each_step(chunk, monkeypatch):
    """The oracle: torch.optim.AdamW on FP32 weights whose moments are rounded to BF16 after every
    step; the same when the step walks the parameter in slices that do not divide it."""
    monkeypatch.setattr(AdamW, "CHUNK", chunk)
    torch.manual_seed(0)
    start = torch.randn(64, 40)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    optimizer, oracle = AdamW([ours], torch.bfloat16, **settings), torch.optim.AdamW([theirs], foreach=False, **settings)
    for _ in range(6):
        grad = torch.randn_like(start)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        oracle.step()
        for key in ("exp_avg", "exp_avg_sq"):
            oracle.state[theirs][key].copy_(oracle.state[theirs][key].bfloat16())
    assert ours.dtype == torch.float32
    assert {optimizer.state[ours][k].dtype for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[ours][key].float(), oracle.state[theirs][key])


@pytest.fixture(scope="module")
def data(embedded_run):
    return embedded_run[1]


def test_bf16_moments_resume_reproduces_the_uninterrupted_losses(data, tmp_path):
    moments = ("--set", "train.optimizer_moments_dtype=bfloat16")
    ok(launch(1, tmp_path / "straight", "--steps", "4", *moments, data=data))
    ok(launch(1, tmp_path / "split", "--steps", "2", *moments, data=data))
    stored = dcp.FileSystemReader(str(tmp_path / "split" / "checkpoints" / "step00000002")).read_metadata()
    dtypes = {key.split("/")[0]: value.properties.dtype for key, value in stored.state_dict_metadata.items()
              if key.endswith("embed_tokens.weight")}
    assert dtypes == {"model": torch.float32, "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
    ok(launch(1, tmp_path / "split", "--steps", "4", "--resume", *moments, data=data))
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]  # bitwise


def test_pipelined_selective_recompute_gives_the_losses_without_it(data, tmp_path):
    layers = ("--set", "model.num_hidden_layers=4", "--set", "train.micro_batch_size=1")
    ok(launch(2, tmp_path / "plain", "--steps", "3", "--pp", "2", *layers, data=data))
    ok(launch(2, tmp_path / "selective", "--steps", "3", "--pp", "2", *layers, "--set", "train.recompute=selective",
              data=data))
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "selective"), strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
        assert a["expert_load"] == b["expert_load"]
