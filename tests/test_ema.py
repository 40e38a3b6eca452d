"""The host-memory EMA of the weights (report 3.2.3): the recurrence by hand, in checkpoints sharded
like the optimizer state (saved on 2 expert-parallel ranks, resumed on 1), exported and evaluated."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from launch.training.ema import HostEMA

from .conftest import ROOT
from .launcher import launch, ok

DECAY = 0.9


def test_host_ema_follows_the_recurrence_and_reads_weights_before_they_change():
    weights = {"a": torch.zeros(5), "b": torch.full((2, 3), 2.0).view(-1)}
    ema = HostEMA(weights, DECAY)
    expected = {name: w.clone() for name, w in weights.items()}
    for step in range(1, 4):
        for w in weights.values():
            w.add_(step)  # the optimizer step
        for name in expected:
            expected[name] = DECAY * expected[name] + (1 - DECAY) * weights[name]
        ema.update()
        ema.wait()  # before the next optimizer step overwrites the weights
    for name in expected:
        assert torch.allclose(ema.shadow[name], expected[name], atol=1e-6), name
        assert ema.shadow[name].device.type == "cpu"
    ema.close()


def _weights(run_dir, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    from launch.checkpointing.model_source import load_model

    model = load_model(run_dir / "checkpoints" / tag, ema=ema).model
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ema_run(embedded_run, tmp_path_factory):
    """4 steps on 2 ranks with expert parallelism, an EMA (decay 0.9) and a checkpoint every step."""
    run_dir, data = tmp_path_factory.mktemp("ema") / "run", embedded_run[1]
    ok(launch(2, run_dir, "--steps", "4", "--save-interval", "1", "--ep", "2", "--set", f"train.ema.decay={DECAY}",
              data=data))
    return run_dir, data


@pytest.mark.slow
def test_checkpointed_ema_follows_the_weights_and_resumes_on_another_layout(ema_run, tmp_path):
    run_dir, data = ema_run
    before, after, weights = (_weights(run_dir, "step00000003", True), _weights(run_dir, "step00000004", True),
                              _weights(run_dir, "step00000004", False))
    for name in weights:
        assert torch.allclose(after[name], DECAY * before[name] + (1 - DECAY) * weights[name], atol=1e-6), name
    assert any(not torch.equal(after[n], weights[n]) for n in weights)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    ok(launch(1, resumed, "--steps", "4", "--resume", "--set", f"train.ema.decay={DECAY}", data=data))
    again = _weights(resumed, "step00000004", True)
    for name in after:
        assert torch.allclose(again[name], after[name], atol=1e-6), name


@pytest.mark.slow
def test_ema_exports_and_evaluates(ema_run, embedded_run, tmp_path):
    from launch.convert import main as convert
    from launch.evaluate import main as evaluate
    from plugins.interop.hf import load_hf_checkpoint

    run_dir, _ = ema_run
    assert convert([str(run_dir), str(tmp_path / "hf"), "--ema"]) == 0
    exported = dict(load_hf_checkpoint(tmp_path / "hf").named_parameters())
    ema = _weights(run_dir, "step00000004", True)
    assert exported.keys() == ema.keys() and all(torch.equal(exported[n], ema[n]) for n in ema)
    # --fp8 with --ema: the release format of those same EMA weights
    from .test_fp8_release import tensors_of, weight_quant

    assert convert([str(run_dir), str(tmp_path / "fp8"), "--ema", "--fp8"]) == 0
    plain, fp8 = tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "fp8")
    quantized = [k for k in fp8 if k + "_scale_inv" in fp8]
    assert quantized and all(torch.equal(weight_quant(plain[k])[0].view(torch.uint8), fp8[k].view(torch.uint8))
                             for k in quantized)
    packed = [f"{name}={path}" for name, path in embedded_run[1]["validation"].items()]
    losses = {}
    for flag in ([], ["--ema"]):
        out = tmp_path / f"eval{len(flag)}.json"
        assert evaluate(["--model", str(run_dir), *flag, "--packed", *packed, "--max-sequences", "4",
                         "--output", str(out)]) == 0
        losses[bool(flag)] = json.loads(out.read_text())["packed"]["code"]["loss"]
    assert losses[True] != losses[False]
    result = subprocess.run([sys.executable, "-m", "launch.convert", str(embedded_run[0]), str(tmp_path / "none"),
                             "--ema"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "holds no EMA" in result.stderr


@pytest.mark.slow
def test_lm_eval_ema_scores_the_ema_weights(ema_run):
    """``model_args ema=true``: lm-eval's loglikelihood is the one of the weights ``load_model(path,
    ema=True)`` reads (computed here from the model's logits), not the trained weights'."""
    pytest.importorskip("lm_eval", reason="the eval extra")
    from lm_eval.api.instance import Instance

    from launch.checkpointing.model_source import load_model
    from launch.evaluation.lm_eval import DeepSeekPretrainLM
    from tokenizer.load import load_tokenizer_dir

    run_dir, _ = ema_run
    context, continuation = "import os", " and sys"  # a word boundary: the pair's tokens are the whole's

    def by_hand(ema: bool) -> float:
        loaded = load_model(run_dir, ema=ema)
        bundle = load_tokenizer_dir(loaded.tokenizer_dir)
        whole = [bundle.bos_id, *bundle.encode(context + continuation)]
        start = 1 + len(bundle.encode(context))
        assert whole[:start] == [bundle.bos_id, *bundle.encode(context)]
        with torch.no_grad():
            logprobs = loaded.model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        return sum(logprobs[t - 1, whole[t]].item() for t in range(start, len(whole)))

    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    scored = {ema: DeepSeekPretrainLM.create_from_arg_string(f"path={run_dir},ema={str(ema).lower()}")
              .loglikelihood([request], disable_tqdm=True)[0][0] for ema in (True, False)}
    expected = {ema: by_hand(ema) for ema in (True, False)}
    for ema in (True, False):
        assert scored[ema] == pytest.approx(expected[ema], rel=1e-6), (ema, scored, expected)
    assert abs(expected[True] - expected[False]) > 1e-4 * abs(expected[False]), expected  # the EMA is other weights
