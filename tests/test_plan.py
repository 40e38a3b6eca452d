"""The planner (``python -m launch.plan``) and the walked recipe: the ramp under DualPipe never hands
the schedule a count it cannot run, the 671B recipe walks clean at the report's layout, and the
estimate's parameter and optimizer bytes equal hand computations on the really built model."""

import json

import pytest
import torch

from launch.config.run_config import load_run_config
from launch.config.schedules import BatchGrid, batch_size, check_schedule
from launch.plan import main as plan_main
from launch.planning.walk import walk
from plugins.errors import ConfigError
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.experts import RoutedExperts
from plugins.parallel.dualpipe import ScheduleError, check

from .conftest import ROOT

V3 = ROOT / "configs" / "deepseek_v3_671b.yaml"
TINY = ROOT / "configs" / "tiny.yaml"


def test_the_ramp_never_gives_dualpipe_an_odd_count():
    """The old crash: pp 8, dp 128, micro-batch 1 rounded the ramp to multiples of 128 sequences, so
    3200 sequences = 25 micro-batches reached DualPipe mid-ramp."""
    recipe = load_run_config(V3).train.batch
    tokens = (3200 - 3072) / (15360 - 3072) * recipe.ramp_tokens  # where the raw ramp is exactly 3200
    assert int((3072 + (15360 - 3072) * tokens / recipe.ramp_tokens) // 128) * 128 == 3200  # the old rounding
    with pytest.raises(ScheduleError):
        check("dualpipe", 8, 3200 // 128)
    grid = BatchGrid.of(1, 128, 8, "dualpipe")
    assert batch_size(recipe, tokens, grid) == 3072
    for step in range(0, 4000):  # every ramp position, 0.1% of the ramp apart
        size = batch_size(recipe, step * recipe.ramp_tokens / 3999, grid)
        check("dualpipe", 8, size // 128)  # raises on a count DualPipe cannot run


def test_671b_recipe_walks_clean_under_dualpipe_pp16(capsys):
    run = load_run_config(V3, ["parallel.pp=16", "parallel.ep=64", "parallel.pipeline_schedule=dualpipe"])
    grid = check_schedule(run, 16, 128)
    stretches = walk(run, 16, 128, grid)
    assert all(s.problem is None for s in stretches)
    assert stretches[0].batch == 4096 and stretches[-1].batch == 15360  # 3072 = 24 < 32 micro-batches
    tokens = stretches[-1].tokens_before + (stretches[-1].last - stretches[-1].first + 1) * 15360 * 4096
    assert 14.8e12 <= tokens < 14.8e12 + 15360 * 4096
    assert {s.lam for s in stretches} == {0.3, 0.1} and {s.gamma for s in stretches} == {0.001, 0.0}
    assert [s.lr_first for s in stretches][:1] == [pytest.approx(2.2e-4 / 2000)]
    code = plan_main([str(V3), "--pp", "16", "--ep", "64", "--dp", "128", "--pipeline-schedule", "dualpipe",
                      "--walk"])
    assert code == 0 and "every step runs" in capsys.readouterr().out


def test_walk_json_is_the_walked_recipe(capsys):
    assert plan_main([str(TINY), "--walk", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    run = load_run_config(TINY)
    stretches = walk(run, 1, 1, check_schedule(run, 1, 1))
    assert [(s["first"], s["last"], s["batch"], s["phase"]) for s in answer["stretches"]] == \
        [(s.first, s.last, s.batch, s.phase) for s in stretches]
    assert answer["first_step_that_cannot_run"] is None and answer["steps"] == stretches[-1].last
    assert answer["tokens"] >= run.train.total_tokens
    assert plan_main([str(TINY), "--walk"]) == 0
    assert f"every step runs: {answer['steps']} steps" in capsys.readouterr().out


def test_a_final_batch_dualpipe_cannot_run_is_one_line():
    run = load_run_config(V3, ["parallel.pp=8", "train.batch.final=15232"])  # 15232 / 128 = 119, odd
    with pytest.raises(ConfigError, match=r"train.batch.final = 15232 sequences = 119 micro-batches"):
        check_schedule(run, 8, 128)


def _plan(capsys, *argv):
    assert plan_main([str(TINY), "--device", "cpu", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_parameter_and_optimizer_bytes_match_the_built_model(capsys):
    """One rank of (ep 2, dp 4) on CPU: fp32 weights of the experts it builds; ZeRO-1 splits the
    non-expert master weights and moments over 4 ranks and the expert ones over dp / ep = 2."""
    plan = _plan(capsys, "--ep", "2", "--dp", "4", "--set", "train.micro_batch_size=1")
    config = load_run_config(TINY).model
    model = DeepSeekV3(config)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    held = total - experts // 2
    rank = plan["ranks"][0]
    shard = (total - experts) / 4 + (experts // 2) / 2
    assert rank["parameters_bytes"] == held * 4
    assert rank["gradients_bytes"] == pytest.approx(held * 4 + shard * 4)  # whole + ZeRO's flat FP32 partition
    assert rank["optimizer_bytes"] == pytest.approx(shard * 4 * 3)  # master + two fp32 moments
    bf16 = _plan(capsys, "--ep", "2", "--dp", "4", "--set", "train.micro_batch_size=1",
                 "--set", "train.optimizer_moments_dtype=bfloat16")
    assert bf16["ranks"][0]["optimizer_bytes"] == pytest.approx(shard * (4 + 2 * 2))


def test_json_keys_and_schedule_aware_activations(capsys):
    plan = _plan(capsys, "--pp", "2", "--set", "model.num_hidden_layers=4", "--set", "train.micro_batch_size=1")
    assert {"ranks", "largest_rank_total_bytes", "runtime_overhead_bytes", "flops_per_token", "fits"} <= set(plan)
    for rank in plan["ranks"]:
        assert {"parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                "total_bytes"} <= set(rank)
    assert plan["fits"] is True and plan["largest_rank_total_bytes"] == max(r["total_bytes"] for r in plan["ranks"])
    assert [r["activation_micro_batches"] for r in plan["ranks"]] == [3, 3]  # DualPipe at pp 2: PP + 1
    one = _plan(capsys, "--set", "model.num_hidden_layers=4", "--set", "train.micro_batch_size=1")
    assert one["ranks"][0]["activation_micro_batches"] == 1  # gradient accumulation: one at a time
    full = _plan(capsys, "--recompute", "full", "--set", "model.num_hidden_layers=4")
    none = _plan(capsys, "--recompute", "none", "--set", "model.num_hidden_layers=4")
    assert full["ranks"][0]["activations_bytes"] < none["ranks"][0]["activations_bytes"]


def test_flops_per_token_by_hand():
    """The tiny model without MTP, every expert active: 6 x the non-embedding weights + causal attention."""
    from plugins.model.flops import flops_per_token, mfu

    config = load_run_config(TINY, ["model.num_nextn_predict_layers=0", "model.n_routed_experts=4",
                                    "model.num_experts_per_tok=4", "model.n_group=2", "model.topk_group=2"]).model
    model = DeepSeekV3(config)
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    attention = 3 * config.num_hidden_layers * config.num_attention_heads * (48 + 32) * 128
    assert flops_per_token(config, 128)["total"] == 6 * weights + attention
    assert mfu(1e9, 1e3, 2, 1e12) == pytest.approx(0.5)


@pytest.mark.parametrize("argv,message", [
    (["--dp", "3", "--ep", "2"], "--ep 2: does not divide the data-parallel size 3"),
    (["--set", "train.recompute=some"], "train.recompute: expected one of none, selective, full"),
    (["--pp", "4"], "train.batch.final = 16 sequences = 4 micro-batches of 4 per pipeline at --pp 4"),
    (["--dp", "0"], "--dp 0: expected a positive number"),
    (["--device-memory-gb", "nan"], "--device-memory-gb nan: expected a positive size"),
    (["--device-memory-gb", "inf"], "--device-memory-gb inf: expected a positive size"),
    (["--fp8", "te", "--recompute", "selective"], "train.recompute: selective with --fp8 te cannot run"),  # as the trainer
])
def test_a_bad_flag_is_one_line(capfd, argv, message):
    assert plan_main([str(TINY), *argv]) == 2
    err = capfd.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_rank_parameters_equal_the_built_rank():
    """pp 2 DualPipe: each rank builds stages 0 and 1; the planner's per-rank count is that module's."""
    from plugins.parallel.rank_share import rank_model

    run = load_run_config(TINY, ["model.num_hidden_layers=4"])
    with torch.device("meta"):
        built = rank_model(run.model, 2, 1, "dualpipe", 0)
    from launch.planning.rank_memory import Layout3D, Precision, plan_ranks

    ranks = plan_ranks(run.model, Layout3D(2, 1, 1, 1, 128, "dualpipe", 4, "none", "cpu"),
                       Precision.of("cpu", "float32", "none"), run.train.memory)
    assert ranks[0]["parameters"] == sum(p.numel() for p in built.parameters())


def test_the_reports_layout_counts_every_term_with_fp32_gradient_accumulation(capsys):
    """PP16 DualPipe x EP64 x DP128, micro-batch 1 x 4096, selective recompute, FP8, BF16 moments, on
    80 GB under the report's precision recipe: every term stays in the total, the gradients are the
    FP32 accumulators (4 bytes a parameter, report 3.3), and the FFN offload takes exactly what it
    keeps in host memory off the device. (FP32 accumulation puts the largest rank over 80 GB:
    docs/planner.md, the report's layout.)"""
    argv = [str(V3), "--pp", "16", "--ep", "64", "--dp", "128", "--micro-batch", "1", "--seq-len", "4096",
            "--pipeline-schedule", "dualpipe", "--recompute", "selective", "--fp8", "emulated",
            "--set", "train.optimizer_moments_dtype=bfloat16", "--device", "gpu", "--device-memory-gb", "80", "--json"]
    assert plan_main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["precision"] == "bf16"
    terms = ("parameters_bytes", "fp8_weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
             "communication_bytes")
    for rank in plan["ranks"]:
        assert rank["total_bytes"] == pytest.approx(sum(rank[t] for t in terms))
        assert all(rank[t] > 0 for t in terms) and rank["offload_host_bytes"] > 0
        assert rank["gradients_bytes"] >= 4 * rank["parameters"] and rank["parameters_bytes"] == 2 * rank["parameters"]
    assert plan_main([*argv, "--set", "train.memory.offload_ffn=false"]) == 0
    kept = json.loads(capsys.readouterr().out)
    for on, off in zip(plan["ranks"], kept["ranks"]):
        assert off["total_bytes"] > on["total_bytes"] and off["offload_host_bytes"] == 0
