"""The step-time model (``launch.plan --hardware``, ``launch.planning.step_time``): the breakdown sums
to the step, more compute per all-to-all hides more of it under DualPipe, the pipeline bubbles are
the simulator's for equal op durations, ``--search`` returns only layouts that fit, the hardware
profiles load and a bad profile or flag is one line. Timing numbers themselves are the benchmark's
(``benchmarks/time_vs_measured.py``), never asserted here."""

import dataclasses
import json

import pytest
import yaml

from launch.config.run_config import load_run_config
from launch.plan import main as plan_main
from launch.planning.comm_time import all_to_all, nodes_per_token
from launch.planning.estimate import estimate
from launch.planning.hardware import HARDWARE_DIR, interpolate, load_hardware
from launch.planning.step_time import StageTimes, pipeline_time, step_time
from plugins.errors import ConfigError
from plugins.model.config import ModelConfig
from plugins.parallel.dualpipe import check
from plugins.parallel.pipeline_sim import Costs, bubbles, simulate

from .conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"
V3 = ROOT / "configs" / "deepseek_v3_671b.yaml"


def plan_of(overrides: list[str], dp: int, hw: str = "h800", device: str = "gpu") -> dict:
    run = load_run_config(TINY, overrides)
    plan = estimate(run, dp, device, 80.0)
    plan.update(step_time(run, plan, load_hardware(hw)))
    return plan


@pytest.mark.parametrize("overrides, dp", [
    ([], 1),
    (["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"], 2),
    (["parallel.pp=2", "parallel.pipeline_schedule=1f1b", "train.recompute=selective"], 1),
    (["parallel.fp8=emulated", "train.memory.offload_ffn=true", "parallel.ep=2"], 2),
])
def test_the_breakdown_sums_to_the_step(overrides, dp):
    plan = plan_of(overrides, dp)
    assert sum(plan["breakdown"].values()) == pytest.approx(plan["step_seconds"], rel=1e-9)
    assert all(v >= 0 for v in plan["breakdown"].values())
    assert plan["tokens_per_second_per_gpu"] == pytest.approx(
        plan["tokens_per_step"] / plan["step_seconds"] / plan["layout"]["world"])
    assert 0 < plan["mfu"] < 1


def test_more_compute_per_all_to_all_hides_more_communication(tmp_path):
    """DualPipe's FB pairs hide the all-to-all while computation lasts longer (report 3.2.2): wider
    experts (more GEMM work per dispatched row, the same bytes) leave less of it exposed. A slow
    link (150 MB/s) puts the tiny model's transfers and computation at the same scale."""
    hw = _write(tmp_path, {"intra_node": {"bandwidth": 1.5e8, "efficiency": 1.0}})
    layout = ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1", "parallel.pipeline_schedule=dualpipe"]
    exposed, sent = [], []
    for width in (64, 65536):
        plan = plan_of(layout + [f"model.moe_intermediate_size={width}"], 2, hw=hw)
        exposed.append(plan["breakdown_detail"]["pipeline_communication"])
        sent.append([(s["f_comm"], s["b_comm"]) for s in plan["stages"]])
    assert sent[0] == sent[1]  # the same bytes
    assert exposed[1] < exposed[0]


def test_fb_pair_exposes_only_what_the_transfers_last_beyond_the_compute():
    layout = check("dualpipe", 2, 4)
    quick = pipeline_time(layout, [StageTimes(1, 1, 1, f_comm=0.5, b_comm=0.5)] * layout.stages)
    slow = pipeline_time(layout, [StageTimes(1, 1, 1, f_comm=5, b_comm=5)] * layout.stages)
    assert slow["communication"] > quick["communication"]
    assert quick["compute"] == pytest.approx(slow["compute"])


@pytest.mark.parametrize("schedule, pp, micro", [("dualpipe", 4, 8), ("dualpipe", 8, 20), ("1f1b", 4, 8),
                                                 ("dualpipev", 4, 8)])
def test_pipeline_bubbles_equal_the_simulators_for_equal_op_durations(schedule, pp, micro):
    layout = check(schedule, pp, micro)
    f, i, w = 1.0, 1.25, 0.75
    ours = pipeline_time(layout, [StageTimes(f, i, w)] * layout.stages)
    reference = simulate(layout, Costs(f=f, b=i + w, w=w, fb=f + i + w))
    assert ours["bubbles"] == pytest.approx(bubbles(layout, reference))
    assert ours["seconds"] == pytest.approx(max(x.end for x in reference))
    assert ours["compute"] + ours["bubble"] == pytest.approx(ours["seconds"])


def test_node_limited_routing_caps_the_nodes_a_token_reaches():
    """Report 3.2.2: at most 4 nodes per token (of the 8 that EP64 spans), so IB carries 3.5 rows a
    token on average (its own node's share free) where unrestricted top-8 routing would reach ~5.25."""
    v3 = ModelConfig.from_yaml(V3)
    assert nodes_per_token(v3, 8) == 4
    free = dataclasses.replace(v3, topk_group=v3.n_group)
    assert nodes_per_token(free, 8) == pytest.approx(8 * (1 - (7 / 8) ** 8))
    h800 = load_hardware("h800")
    exchange = all_to_all(v3, 4096, 7168, 64, h800, calls=1)
    assert exchange.ib_bytes == pytest.approx(4096 * 4 * 7 / 8 * 7168)
    assert all_to_all(v3, 4096, 7168, 8, h800, calls=1).ib_bytes == 0  # one node: NVLink only


def test_search_returns_only_layouts_that_fit(capsys):
    def ranked(memory_gb: float) -> list[dict]:
        assert plan_main([str(TINY), "--hardware", "h800", "--search", "--gpus", "2", "--micro-batch", "1",
                          "--global-batch", "8", "--device-memory-gb", str(memory_gb), "--json", "--top", "100"]) == 0
        return json.loads(capsys.readouterr().out)

    everything = ranked(80.0)
    sizes = sorted(r["largest_rank_total_bytes"] for r in everything)
    assert sizes[0] < sizes[-1]
    limit = (sizes[0] + sizes[-1]) / 2 / 1e9
    kept = ranked(limit)
    assert kept and len(kept) < len(everything)
    assert all(r["fits"] and r["largest_rank_total_bytes"] <= limit * 1e9 for r in kept)
    assert [r["step_seconds"] for r in kept] == sorted(r["step_seconds"] for r in kept)
    assert {(r["layout"]["pp"], r["layout"]["dp"]) for r in everything} == {(1, 2), (2, 1)}


def test_every_profile_loads_with_a_source_for_each_figure():
    for path in sorted(HARDWARE_DIR.glob("*.yaml")):
        hw = load_hardware(path.stem)
        assert hw.name == path.stem and hw.peak("bf16") > 0 and hw.peak("fp8") > hw.peak("bf16")
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            value = line.split("#")[0].split(":", 1)[-1].strip()
            if ":" in line and not line.lstrip().startswith("#") and value and value[0] in "0123456789[":
                assert "#" in line or lines[n - 1].lstrip().startswith("#"), f"{path.name}: {line!r} has no source"


def test_the_gemm_curve_interpolates_in_log_rows():
    curve = ((64, 0.1), (4096, 0.7))
    assert interpolate(curve, 8) == 0.1 and interpolate(curve, 10**6) == 0.7
    assert interpolate(curve, 512) == pytest.approx(0.4)


def _write(tmp_path, changes: dict, drop: str | None = None):
    raw = yaml.safe_load((HARDWARE_DIR / "h800.yaml").read_text())
    raw.update(changes)
    if drop:
        del raw[drop]
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("changes, drop, message", [
    ({}, "op_seconds", "hardware.op_seconds: required"),
    ({"memory": {"bandwidth": -1}}, None, "memory.bandwidth: expected a positive number"),
    ({"inter_node": {"bandwidth": 5e10, "efficiency": 1.5}}, None, "inter_node.efficiency: expected a fraction"),
    ({"gemm_curve": [[64, 0.5], [32, 0.6]]}, None, "gemm_curve: expected [[rows, fraction of peak]"),
    ({"flops": {"bf16": "fast"}}, None, "hardware.flops.bf16: expected a number"),
    ({"communication_sms": 200}, None, "communication_sms: expected 0 <= it < sms"),
    ({"speed": 1}, None, "hardware.speed: unknown key"),
])
def test_a_bad_hardware_file_is_one_line(tmp_path, changes, drop, message):
    path = _write(tmp_path, changes, drop)
    with pytest.raises(ConfigError) as error:
        load_hardware(path)
    assert message in str(error.value) and path in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--hardware", "h900"], "--hardware h900: no such profile (known: b200, h100, h200, h800)"),
    (["--search", "--gpus", "4"], "--search: needs --hardware"),
    (["--search", "--hardware", "h800"], "--gpus None: --search needs a positive number of devices"),
    (["--gpus", "4", "--hardware", "h800"], "--gpus: only with --search"),
    (["--hardware", "h800", "--global-batch", "0"], "--global-batch 0: expected a positive number of sequences"),
    (["--search", "--gpus", "4", "--hardware", "h800", "--dp", "2"], "--dp 2: not with --search"),
    (["--hardware", "h800", "--device", "cpu"], "flops.fp32: not given"),
])
def test_a_bad_flag_is_one_line(capfd, argv, message):
    assert plan_main([str(TINY), *argv]) == 2
    err = capfd.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_calibrate_writes_a_profile_the_plan_reads(tmp_path, capsys):
    """``launch.calibrate`` on this machine (2 gloo ranks, ~20 s), then the tiny recipe's plan on it."""
    from launch.calibrate import main as calibrate_main

    out = tmp_path / "hw.yaml"
    assert calibrate_main(["--output", str(out), "--device", "cpu", "--ranks", "2"]) == 0
    hw = load_hardware(str(out))
    assert hw.peak("fp32") > 0 and hw.op_seconds > 0 and hw.intra_node.bandwidth > 0 and hw.cores >= 1
    capsys.readouterr()
    assert plan_main([str(TINY), "--device", "cpu", "--hardware", str(out), "--global-batch", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["step_seconds"] > 0 and plan["hardware"] == hw.name
