"""The offline dashboard at DeepSeek-V3's scale (58 MoE blocks x 256 experts), from a synthetic
metrics.jsonl with train and evaluation records; and the per-step MoE statistics by hand."""

import json
import time

import numpy as np
import pytest
import torch

from launch.dashboard import main as dashboard
from launch.reporting import plots
from launch.reporting.run_records import Thinned, load_share_stats, read_history
from launch.training.moe_stats import mtp_cross_entropy, router_bias_stats, starved_experts

BLOCKS, EXPERTS, STEPS, DOMAINS = 58, 256, 40, ("code", "math", "web")


def synthetic_run(run_dir, blocks=BLOCKS, experts=EXPERTS, steps=STEPS, evals=(20, 40)):
    """Train records whose loads drift from skewed to balanced, and evaluation records in the contract
    shape; a dead expert in block 0 (starved)."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, steps + 1):
        skew = 1.0 - step / (steps + 1)
        loads = rng.poisson(100 * (1 + skew * rng.standard_exponential((blocks, experts)))).astype(float)
        loads[0, 3] = 0
        lam = 0.3 if step <= steps // 2 else 0.1
        mean = loads.mean(axis=1)
        lines.append({
            "step": step, "tokens": step * 1024, "loss": 10 - step * 0.1, "lm_loss": 8 - step * 0.08,
            "mtp_loss": lam * (8.5 - step * 0.08), "mtp_ce": 8.5 - step * 0.08, "aux_loss": 1e-4, "lr": 1e-3,
            "grad_norm": 1.0, "tokens_per_s": 5000.0, "step_seconds": 0.2, "batch_size": 8, "mtp_weight": lam,
            "bias_update_speed": 0.001, "maxvio": ((loads.max(axis=1) - mean) / mean).tolist(),
            "maxvio_global": float(((loads.max(axis=1) - mean) / mean).mean()),
            "bias_min": [-0.001 * step] * blocks, "bias_max": [0.001 * step] * blocks,
            "bias_std": [0.0005 * step] * blocks, "starved": starved_experts(loads),
            "expert_load": loads.tolist()})
        if step in evals:
            lines.append({
                "step": step, "tokens": step * 1024,
                "val": {d: {"loss": 6.0 - step * 0.01 + i, "bpb": 1.5 + i * 0.1, "tokens": 4096}
                        for i, d in enumerate(DOMAINS)},
                "maxvio_batch": 0.5, "maxvio_batch_per_block": [0.5] * blocks, "specialization": 0.2,
                "specialization_per_block": [0.2] * blocks,
                "domain_load": {d: rng.poisson(50, (blocks, experts)).tolist() for d in DOMAINS}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


def _heatmap_axes(figure):
    return [ax for ax in figure.axes if ax.images and ax.get_xlabel() == "expert"]


def test_dashboard_at_58_blocks_x_256_experts_writes_every_figure_with_integer_expert_ticks(tmp_path, monkeypatch,
                                                                                           capsys):
    run_dir = tmp_path / "run"
    synthetic_run(run_dir)
    seen = {}
    save = plots.save

    def inspect(figure, path):
        seen[path.stem] = [(ax.get_title(), list(ax.get_xticks()), [t.get_text() for t in ax.get_xticklabels()],
                            ax.get_xlim()) for ax in _heatmap_axes(figure)]
        save(figure, path)

    monkeypatch.setattr(plots, "save", inspect)
    started = time.perf_counter()
    assert dashboard([str(run_dir)]) == 0
    seconds = time.perf_counter() - started
    assert seconds < 60, seconds  # ~10 s on the 2-core CPU machine
    expected = {"loss", "expert_load", "expert_load_time", "expert_load_time_worst", "load_share", "maxvio",
                "router_bias", "starved", "val", "specialization"}
    assert set(seen) == expected
    printed = capsys.readouterr().out.splitlines()
    assert sorted(printed) == sorted(f"wrote {run_dir / 'plots' / name}.png" for name in expected)
    for name in expected:
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 5000, name
    # every block gets a time x expert panel, and one per block for the last evaluation
    assert len(seen["expert_load_time"]) == BLOCKS and len(seen["specialization"]) == BLOCKS
    assert [t for t, *_ in seen["expert_load_time"]] == [f"block {b}" for b in range(BLOCKS)]
    assert len(seen["expert_load_time_worst"]) == 4
    for name in ("expert_load", "expert_load_time", "expert_load_time_worst", "specialization"):
        for title, ticks, labels, (left, right) in seen[name]:
            assert ticks and all(float(t).is_integer() and 0 <= t < EXPERTS for t in ticks), (name, title, ticks)
            assert [int(label) for label in labels] == [int(t) for t in ticks], (name, title, labels)
            assert 2 <= len(ticks) <= 9 and left < 0 and right > EXPERTS - 1  # every expert column is shown


def test_dashboard_reads_a_few_experts_and_tells_bad_lines(tmp_path, capsys):
    run_dir = tmp_path / "small"
    synthetic_run(run_dir, blocks=2, experts=6, steps=5, evals=(5,))
    assert dashboard([str(run_dir)]) == 0
    assert "expert_load_time_worst" not in capsys.readouterr().out  # 2 blocks: all of them are large
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "lm_loss": 1}\n')
    assert dashboard([str(run_dir)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run_dir / 'metrics.jsonl'}: line 7: expected a train record "
                                               "(numbers step, loss, lm_loss, mtp_loss) or an evaluation record "
                                               "(step, val)")


def test_expert_ticks_are_integers_for_any_count():
    for count in (1, 3, 6, 16, 64, 160, 256):
        ticks = plots.integer_ticks(count)
        assert ticks[0] == 0 and ticks[-1] < count and len(ticks) <= 9
        assert all(isinstance(t, int) for t in ticks) and len(set(np.diff(ticks))) <= 1


def test_history_is_bounded_and_evenly_thinned():
    kept = Thinned(8)
    for i in range(100):
        kept.append(i)
    items = kept.items
    assert len(items) <= 9 and items[0] == 0 and items[-1] == 99
    assert len(set(np.diff(items[:-1]))) == 1  # evenly spaced, plus the latest


def test_read_history_splits_train_and_eval_records(tmp_path):
    lines = synthetic_run(tmp_path / "run", blocks=3, experts=8, steps=6, evals=(3, 6))
    history = read_history(tmp_path / "run")
    assert [r["step"] for r in history.train.items] == list(range(1, 7))
    assert [r["step"] for r in history.evals] == [3, 6]
    first = next(r for r in lines if "expert_load" in r)["expert_load"][1]
    assert history.train.items[0]["load_max"][1] == pytest.approx(max(first) / sum(first))
    assert np.array_equal(history.loads.items[0].loads[1], np.array(first, dtype=np.float32))


def test_moe_statistics_by_hand():
    loads = np.array([[10, 0, 30, 40], [20, 20, 20, 20], [1, 39, 40, 0]])
    assert starved_experts(loads) == [1, 0, 2]  # below 0.1 x mean: mean 20 -> < 2, mean 20, mean 20
    stats = load_share_stats(loads)
    assert stats["load_min"] == [0.0, 0.25, 0.0] and stats["load_max"] == [0.5, 0.25, 0.5]
    assert stats["load_std"][1] == 0.0 and stats["load_std"][0] == pytest.approx(np.std([0.125, 0, 0.375, 0.5]))
    assert mtp_cross_entropy(0.6, 0.3, 1) == pytest.approx(2.0)
    assert mtp_cross_entropy(0.0, 0.0, 1) is None and mtp_cross_entropy(0.0, 0.3, 0) is None


class _Gate(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.register_buffer("e_score_correction_bias", torch.tensor(bias, dtype=torch.float32))


class _Block(torch.nn.Module):
    def __init__(self, index, bias):
        super().__init__()
        self.moe_index, self.gate = index, _Gate(bias)


BIASES = [[0.1, -0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.25, 0.25, 0.0]]


def test_router_bias_statistics_of_one_process():
    stats = router_bias_stats([_Block(i, b) for i, b in enumerate(BIASES)], 3, torch.device("cpu"))
    assert stats["bias_min"] == pytest.approx([-0.2, 0.0, -0.5])
    assert stats["bias_max"] == pytest.approx([0.3, 0.0, 0.25])
    assert stats["bias_std"] == pytest.approx([float(np.std(b)) for b in BIASES])


def test_logger_writes_train_and_eval_records_to_wandb_and_the_file_resumes(tmp_path):
    """Train and evaluation lines share metrics.jsonl (a resume keeps both kinds up to its step); W&B
    gets the per-block moe/ keys, train/mtp_ce, val/<domain>/..., and the figures as images."""
    from launch.training.metrics import MetricsLogger

    lines = synthetic_run(tmp_path / "source", blocks=3, experts=8, steps=4, evals=(2, 4))
    logger = MetricsLogger(tmp_path, {}, "offline", "test", heatmap_interval=2, resume_step=None)
    for record in lines:
        if "val" in record:
            logger.log_eval(dict(record))
        else:
            loads = np.array(record["expert_load"], dtype=np.float32)
            logger.log({k: v for k, v in record.items() if k != "expert_load"}, loads)
    logger.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == lines
    history = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    for key in ["train/mtp_ce", "train/tokens", "moe/load_min/block_2", "moe/load_std/block_0",
                "moe/bias_max/block_1", "moe/starved/block_0", "val/code/loss", "val/web/bpb", "val/maxvio_batch",
                "val/specialization/block_2", "moe/expert_load_time", "moe/router_bias", "train/loss_curves"]:
        assert key.encode() in history, key
    resumed = MetricsLogger(tmp_path, {}, "disabled", "test", heatmap_interval=2, resume_step=2)
    resumed.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [r for r in lines if r["step"] <= 2] and sum("val" in r for r in kept) == 1


# Which MoE blocks each of 4 ranks holds: pp 2 x dp 2 (blocks 0-1 on stage 0 = ranks 0-1, block 2 on
# stage 1 = ranks 2-3); DualPipe at pp 4 (stage r and 3 - r per rank: block 0 on ranks 0 and 3, block
# 1 on ranks 1 and 2, block 2 on ranks 1 and 2); pp 4 with rank 0 holding no MoE block.
LAYOUTS = {"pp2_dp2": [[0, 1], [0, 1], [2], [2]], "dualpipe_pp4": [[0], [1, 2], [1, 2], [0]],
           "pp4": [[], [0], [1], [2]]}


def _bias_worker(rank, world, results):
    for name, held in LAYOUTS.items():
        stats = router_bias_stats([_Block(i, BIASES[i]) for i in held[rank]], 3, torch.device("cpu"))
        results[f"{name}/{rank}"] = stats


@pytest.mark.slow
def test_router_bias_statistics_gathered_over_any_layout_equal_one_process():
    import torch.multiprocessing as mp

    from .distributed import spawn

    reference = router_bias_stats([_Block(i, b) for i, b in enumerate(BIASES)], 3, torch.device("cpu"))
    with mp.Manager() as manager:
        results = manager.dict()
        spawn(_bias_worker, 4, results)
        assert len(results) == 4 * len(LAYOUTS)
        for key, stats in results.items():
            assert stats == reference, key  # every rank, exactly
