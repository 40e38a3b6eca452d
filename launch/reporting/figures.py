"""Every figure a run's history can show, by file stem: loss curves, per-block expert load over time
(all blocks as small panels; beyond 8 blocks also the 4 least balanced, large), load-share and
router-bias min/max/std per block, starved experts, MaxVio, the last step's block x expert load,
validation curves and the last evaluation's domain x expert load per block. The W&B logger sends
them as images; ``render`` writes them as ``RUN_DIR/plots/*.png`` (``python -m launch.dashboard``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import plots
from .run_records import History, read_history

DETAIL_BLOCKS = 4


def least_balanced(train: list[dict], count: int = DETAIL_BLOCKS) -> list[int]:
    """The ``count`` blocks of highest mean MaxVio over the run, in block order."""
    maxvio = np.array([r["maxvio"] for r in train if r.get("maxvio")])
    return sorted(np.argsort(-maxvio.mean(axis=0), kind="stable")[:count].tolist())


def figures(history: History) -> Iterator[tuple[str, object]]:
    """(file stem, figure) of everything the history can show."""
    train, samples, evals = history.train.items, history.loads.items, history.evals
    if train:
        yield "loss", plots.loss_curves(train)
    if samples:
        blocks = samples[-1].loads.shape[0]
        yield "expert_load", plots.expert_load_heatmap(samples[-1].loads, samples[-1].step)
        yield "expert_load_time", plots.load_over_time(samples, list(range(blocks)),
                                                       "expert load over training, every MoE block")
        if blocks > 2 * DETAIL_BLOCKS:
            chosen = least_balanced(train)
            yield "expert_load_time_worst", plots.load_over_time(
                samples, chosen, f"expert load over training, the {len(chosen)} blocks of highest mean MaxVio")
        experts = samples[-1].loads.shape[1]
        yield "load_share", plots.block_lines(
            train, ("load_min", "load_max", "load_std"), ("min share", "max share", "std of shares"),
            "expert load share per MoE block", reference={"load_min": 1 / experts, "load_max": 1 / experts})
        yield "maxvio", plots.maxvio_curves(train)
    if any(r.get("bias_max") for r in train):
        yield "router_bias", plots.block_lines(train, ("bias_min", "bias_max", "bias_std"),
                                               ("min", "max", "std"), "router bias per MoE block")
    if any(r.get("starved") for r in train):
        yield "starved", plots.starved_counts(train)
    if evals:
        yield "val", plots.val_curves(evals)
        last = evals[-1]
        if last.get("domain_load"):
            blocks = len(next(iter(last["domain_load"].values())))
            yield "specialization", plots.specialization_heatmaps(last, list(range(blocks)))


def render(run_dir: Path) -> list[Path]:
    history = read_history(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for name, figure in figures(history):
        plots.save(figure, out / f"{name}.png")
        written.append(out / f"{name}.png")
    return written
