"""DualPipe end to end: the schedule simulator against the report's bubble formulas, and
pipelined pre-training through the real launcher against the single-process run."""

import json

import pytest
import yaml

from launch.checkpointing.model_source import load_model
from plugins.parallel.dualpipe import Op, ScheduleError, build_schedule, check
from plugins.parallel.pipeline_sim import Costs, bubbles, formula, simulate
from plugins.parallel.pipeline_sim import main as simulate_main

from .launcher import assert_same_run, assert_same_weights, launch, metrics, ok


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", [Costs(1, 2, 1, 2.5), Costs(1.5, 3, 1.5, 3.9), Costs(1, 2, 1, 3)])
def test_simulated_bubbles_equal_the_report_formulas(pp, costs):
    """In the report's unit (B = 2F, W = F; F&B from fully overlapped to not at all)."""
    for schedule, ranks in (("dualpipe", pp), ("dualpipev", pp // 2), ("1f1b", pp)):
        layout = check(schedule, ranks, 2 * pp + 6)
        assert max(bubbles(layout, simulate(layout, costs))) == pytest.approx(formula(schedule, ranks, costs)), schedule


def test_every_rank_runs_every_micro_batch_of_its_chunks_once():
    layout = check("dualpipe", 8, 20)
    for rank in range(8):
        ops = build_schedule(layout, rank)
        forwards = sorted(op.forward for op in ops if op.forward)
        backwards = sorted(op.backward for op in ops if op.backward)
        expected = sorted((c, m) for c in range(2) for m in layout.micro_batches_of(c))
        assert forwards == backwards == expected
        assert sum(op.kind == "I" for op in ops) == sum(op.kind == "W" for op in ops)
    # rank 0's first overlapped pair: the forward of its 8th micro-batch with the backward of the
    # 4th fed from the other end (report Figure 5)
    assert next(op for op in build_schedule(layout, 0) if op.kind == "FB") == Op("FB", (0, 7), (1, 13))


def test_schedule_requirements_are_clear_errors():
    with pytest.raises(ScheduleError, match="even number of pipeline ranks"):
        check("dualpipe", 3, 12)
    with pytest.raises(ScheduleError, match=r"even number of micro-batches >= 2 x pp = 8"):
        check("dualpipe", 4, 6)
    with pytest.raises(ScheduleError, match="1f1b: needs >= pp = 4"):
        check("1f1b", 4, 3)


def test_simulate_cli_writes_timelines_and_report(tmp_path, capsys):
    assert simulate_main(["simulate", "--pp", "8", "--micro-batches", "20", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bubbles_pp8_m20.json").read_text())
    rows = {r["schedule"]: r for r in report["schedules"]}
    assert rows["dualpipe"]["bubble_max"] == pytest.approx(4.5) and rows["1f1b"]["bubble_max"] == pytest.approx(21)
    for row in rows.values():
        assert (tmp_path / row["timeline"].split("/")[-1]).stat().st_size > 10_000
    assert "dualpipe" in capsys.readouterr().out


LAYERS = ("--set", "model.num_hidden_layers=4", "--set", "train.micro_batch_size=1")


def test_pipelined_training_gives_the_single_process_losses(embedded_run, tmp_path):
    """8 micro-batches per step: --pp 2 and --pp 4 (DualPipe), DualPipeV and 1F1B (its last stage's
    embedding replica summed with stage 0's) follow the one-process run step for step, and the
    --pp 2 run's parameters after 4 steps are the one-process ones. (Pipelining with expert
    parallelism and resuming across layouts: tests/test_sharded_checkpoints.py.)"""
    data = embedded_run[1]
    ok(launch(1, tmp_path / "one", "--steps", "4", *LAYERS, data=data))
    result = ok(launch(2, tmp_path / "pp2", "--steps", "4", "--pp", "2", *LAYERS, data=data))
    assert "pipeline: dualpipe over 2 ranks" in result.stdout
    recorded = yaml.safe_load((tmp_path / "pp2" / "config.yaml").read_text())["parallel"]  # the layout is recorded
    assert (recorded["pp"], recorded["ep"], recorded["pipeline_schedule"]) == (2, 1, "dualpipe")
    ok(launch(4, tmp_path / "pp4", "--steps", "3", "--pp", "4", *LAYERS, data=data))
    ok(launch(2, tmp_path / "v", "--steps", "2", "--pp", "2", "--pipeline-schedule", "dualpipev", *LAYERS, data=data))
    ok(launch(2, tmp_path / "1f1b", "--steps", "2", "--pp", "2", "--pipeline-schedule", "1f1b", *LAYERS, data=data))
    reference = metrics(tmp_path / "one")
    for run, steps in (("pp2", 4), ("pp4", 3), ("v", 2), ("1f1b", 2)):
        records = metrics(tmp_path / run)
        assert [r["step"] for r in records] == list(range(1, steps + 1)), run
        assert_same_run(reference, records, run, keys=("loss", "lm_loss", "mtp_loss", "grad_norm"))
    # Summation order differs across the stages; AdamW's m / sqrt(v) turns a gradient that is noise
    # (an embedding row seen once) into a full step, so a few entries may differ by ~lr, no more.
    theirs, ours = (load_model(tmp_path / run).model.state_dict() for run in ("one", "pp2"))
    assert_same_weights(theirs, ours, reference, "pp2")


def test_pipeline_shapes_that_cannot_run_fail_with_a_clear_error(embedded_run, tmp_path):
    result = launch(2, tmp_path / "few", "--pp", "2", "--set", "train.batch.final=8",
                    data=embedded_run[1])  # 8 sequences / 4 per micro-batch
    assert result.returncode != 0
    assert "train.batch.final = 8 sequences = 2 micro-batches of 4 per pipeline at --pp 2" in result.stderr
    assert "dualpipe: needs an even number of micro-batches >= 2 x pp = 4" in result.stderr
    assert "fix: --set train.micro_batch_size=2" in result.stderr  # 8 / 2 = 4 micro-batches would run
    result = launch(4, tmp_path / "layers", "--pp", "4", "--set", "train.micro_batch_size=1", data=embedded_run[1])
    assert result.returncode != 0 and "fewer blocks than the 4 pipeline stages" in result.stderr
    assert "--set model.num_hidden_layers=4" in result.stderr
