"""Sharded checkpoints through the launcher (4 gloo ranks): saved at one (pp, ep, dp) layout, resumed
at others with the uninterrupted run's losses; each data-parallel rank writes only its share; a
two-node launch trains like one node."""

from __future__ import annotations

import shutil

import pytest
import torch

from .launcher import assert_same_run, assert_same_weights, launch, launch_nodes, metrics, ok

pytestmark = pytest.mark.slow

# Node-limited routing over 2 groups of experts, each token within 1 of them (report 2.1.2): with
# expert parallelism over two nodes, the groups are the nodes.
COMMON = ("--set", "train.micro_batch_size=1", "--set", "model.n_group=2", "--set", "model.topk_group=1")


@pytest.fixture(scope="module")
def runs(embedded_run, tmp_path_factory):
    """Two uninterrupted 4-step runs on 4 ranks: (pp 2, ep 2, dp 2) keeping its last 3 checkpoints
    and validating at steps 2 and 4, and plain data parallelism (dp 4) saving at step 2."""
    root, data = tmp_path_factory.mktemp("sharded"), embedded_run[1]
    validation = [f"data.validation.{name}={path}" for name, path in data["validation"].items()]
    ok(launch(4, root / "pp2ep2", "--steps", "4", "--save-interval", "1", "--pp", "2", "--ep", "2",
              "--set", "train.keep_checkpoints=3", *COMMON, "--set", "train.eval_interval=2",
              "--set", "train.eval_sequences=8", *(x for v in validation for x in ("--set", v)), data=data))
    ok(launch(4, root / "dp4", "--steps", "4", "--save-interval", "2", *COMMON, data=data))
    return root, data


def test_pipelined_expert_parallel_validation_equals_launch_evaluate(runs, tmp_path):
    """Validation through the pipeline (DualPipe, pp 2) with expert parallelism (ep 2) over 2
    data-parallel replicas scores what one whole model reloaded from the checkpoint scores."""
    import json

    from launch.evaluate import main as evaluate

    from .launcher import eval_records

    root, data = runs
    last = eval_records(root / "pp2ep2")[-1]
    assert last["step"] == 4
    out = tmp_path / "eval.json"
    packed = [f"{name}={path}" for name, path in data["validation"].items()]
    assert evaluate(["--model", str(root / "pp2ep2"), "--packed", *packed, "--max-sequences", "8",
                     "--output", str(out)]) == 0
    for name, result in json.loads(out.read_text())["packed"].items():
        assert result["tokens"] == last["val"][name]["tokens"]
        assert result["loss"] == pytest.approx(last["val"][name]["loss"], rel=1e-5)
        assert result["bpb"] == pytest.approx(last["val"][name]["bpb"], rel=1e-5)


def _resume(runs, source: str, name: str, ranks: int, *layout: str) -> list[dict]:
    """The source run's step-2 checkpoint continued to step 4 at another layout."""
    root, data = runs
    target = root / name
    shutil.copytree(root / source, target)
    (target / "checkpoints" / "latest").write_text("step00000002")
    result = ok(launch(ranks, target, "--steps", "4", "--resume", *layout, *COMMON, data=data))
    assert "resharded on load" in result.stdout or ranks == 4 and not layout
    return metrics(target)


def _same_losses(reference: list[dict], other: list[dict], context: str) -> None:
    assert [r["step"] for r in other] == [r["step"] for r in reference]
    assert_same_run(reference, other, context)


def test_layouts_start_alike_and_keep_the_newest_checkpoints(runs):
    root, _ = runs
    _same_losses(metrics(root / "dp4"), metrics(root / "pp2ep2"), "pp2ep2 vs dp4")
    kept = sorted(p.name for p in (root / "pp2ep2" / "checkpoints").iterdir())
    assert kept == ["latest", "step00000002", "step00000003", "step00000004"]


@pytest.mark.parametrize("name,ranks,layout", [("to_pp1ep4", 4, ("--ep", "4")), ("to_one_rank", 1, ()),
                                               ("to_pp2ep1dp2", 4, ("--pp", "2"))])
def test_pp2_ep2_checkpoint_resumes_at_another_layout(runs, name, ranks, layout):
    root, _ = runs
    resumed = _resume(runs, "pp2ep2", name, ranks, *layout)
    _same_losses(metrics(root / "pp2ep2"), resumed, name)


def test_data_parallel_ranks_write_their_share_and_resume_on_one_rank(runs):
    root, _ = runs
    step = root / "dp4" / "checkpoints" / "step00000002"
    sizes = [(step / f"__{rank}_0.distcp").stat().st_size for rank in range(4)]
    assert max(sizes) <= 0.3 * sum(sizes), sizes  # each rank its ZeRO-1 partition: about a quarter
    resumed = _resume(runs, "dp4", "dp4_to_one_rank", 1)
    _same_losses(metrics(root / "dp4"), resumed, "dp4 -> 1 rank")
    from launch.checkpointing.model_source import load_model

    theirs, ours = (load_model(root / run).model.state_dict() for run in ("dp4", "dp4_to_one_rank"))
    assert_same_weights(theirs, ours, resumed[2:], "dp4 -> 1 rank")  # apart for steps 3 and 4
    assert all(torch.isfinite(v).all() for v in ours.values())


def test_two_nodes_train_like_one(runs):
    """DeepSpeed's per-node launcher twice (2 nodes x 2 ranks), expert parallelism over all 4 ranks:
    the losses of the one-node runs, and node-limited routing keeps every token on 1 node."""
    root, data = runs
    for result in launch_nodes(2, 2, root / "two_nodes", "--steps", "2", "--ep", "4", *COMMON, data=data):
        ok(result)
    two_nodes = metrics(root / "two_nodes")
    _same_losses(metrics(root / "pp2ep2")[:2], two_nodes, "two nodes")
    for record in two_nodes:
        assert record["ep_destination_nodes_max"] == 1.0 and record["ep_destination_nodes_mean"] == 1.0
        assert 1.0 < record["ep_destinations_mean"] <= record["ep_destinations_max"] <= 2.0
