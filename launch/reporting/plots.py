"""Figures shared by the W&B logger and the dashboard CLI (matplotlib, no display needed).

Readable at DeepSeek-V3's scale (58 MoE blocks x 256 experts): per-block curves are one thin line
per block coloured by its index (a colour bar, no 58-entry legend), time x expert heatmaps are a
grid of small panels on one colour scale, expert and block axes carry integer ticks. Expert load
is shown relative to the block's mean (1 = uniform), as the report's Figure 9.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from plugins.atomic import save_figure_atomic  # noqa: E402

RELATIVE = "load / mean load (1 = uniform)"


def integer_ticks(count: int, most: int = 9) -> list[int]:
    """Integer positions 0, s, 2s, ... below ``count`` with a power-of-two step s giving at most ``most``."""
    step = 1
    while math.ceil(count / step) > most:
        step *= 2
    return list(range(0, count, step))


def _expert_axis(ax, experts: int) -> None:
    ax.set_xticks(integer_ticks(experts))
    ax.set_xlabel("expert")


def _relative(loads: np.ndarray) -> np.ndarray:
    """Each row over its mean (the last axis is the experts)."""
    loads = np.asarray(loads, dtype=float)
    return loads / np.maximum(loads.mean(axis=-1, keepdims=True), 1e-12)


def _norm(values: np.ndarray) -> TwoSlopeNorm:
    top = float(np.nanpercentile(values, 99.5)) if values.size else 2.0
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))


def _grid(panels: int, width: float, height: float, max_cols: int = 8):
    cols = min(panels, max_cols, max(1, math.ceil(math.sqrt(panels))))
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.2, height * rows + 0.8), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[panels:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:panels]


def expert_load_heatmap(loads: np.ndarray, step: int):
    """MoE block x expert heatmap of each expert's load relative to its block's mean, at one step."""
    relative = _relative(loads)
    blocks, experts = relative.shape
    fig, ax = plt.subplots(figsize=(min(16, max(5, experts * 0.3)), min(12, max(2.5, blocks * 0.3))),
                           layout="constrained")
    image = ax.imshow(relative, aspect="auto", cmap="RdBu_r", norm=_norm(relative), interpolation="nearest")
    _expert_axis(ax, experts)
    ax.set_yticks(integer_ticks(blocks, 12))
    ax.set_ylabel("MoE block")
    ax.set_title(f"expert load, step {step}")
    fig.colorbar(image, ax=ax, label=RELATIVE)
    return fig


def load_over_time(samples, blocks: list[int], title: str):
    """One panel per chosen block: logged step (down) x expert, each expert's load relative to the
    block's mean at that step; one colour scale over all panels."""
    steps = np.array([s.step for s in samples])
    cube = _relative(np.stack([s.loads[blocks] for s in samples]))  # [time, chosen blocks, experts]
    experts = cube.shape[-1]
    norm = _norm(cube)
    large = len(blocks) <= 4
    fig, axes = _grid(len(blocks), 4.5 if large else 2.2, 3.2 if large else 1.7, max_cols=2 if large else 8)
    top = steps[0] - 0.5 if len(steps) == 1 else steps[0]
    for ax, block, index in zip(axes, blocks, range(len(blocks))):
        image = ax.imshow(cube[:, index], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                          extent=(-0.5, experts - 0.5, steps[-1] + (0.5 if len(steps) == 1 else 0), top))
        ax.set_title(f"block {block}", fontsize=9 if large else 7)
        _expert_axis(ax, experts)
        ax.set_ylabel("step")
        if not large:
            ax.tick_params(labelsize=6)
            ax.xaxis.label.set_size(6)
            ax.yaxis.label.set_size(6)
    fig.colorbar(image, ax=list(axes), label=RELATIVE, shrink=0.8)
    fig.suptitle(title)
    return fig


def _per_block(ax, steps, values: np.ndarray, label: str):
    """One line per MoE block, coloured by block index."""
    colors = plt.cm.viridis(np.linspace(0, 1, max(values.shape[1], 1)))
    width = 1.2 if values.shape[1] <= 8 else 0.6
    for block in range(values.shape[1]):
        ax.plot(steps, values[:, block], color=colors[block], linewidth=width, alpha=0.85)
    ax.set_ylabel(label)
    ax.set_xlabel("step")


def _block_colorbar(fig, axes, blocks: int) -> None:
    mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(-0.5, blocks - 0.5))
    bar = fig.colorbar(mappable, ax=list(axes), label="MoE block", shrink=0.8)
    bar.set_ticks(integer_ticks(blocks, 10))


def _column(train: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in train if r.get(key)]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def block_lines(train: list[dict], keys: tuple[str, ...], labels: tuple[str, ...], title: str, reference=None):
    """Panels of per-block curves (e.g. load-share min/max/std); ``reference`` a dashed level."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys) + 1.2, 3.8), squeeze=False, layout="constrained")
    blocks = 0
    for ax, key, label in zip(axes[0], keys, labels):
        steps, values = _column(train, key)
        if values.size:
            blocks = values.shape[1]
            _per_block(ax, steps, values, label)
            if reference is not None and key in reference:
                ax.axhline(reference[key], color="black", linestyle="--", linewidth=1, label="uniform")
                ax.legend(fontsize=7)
    if blocks:
        _block_colorbar(fig, axes[0], blocks)
    fig.suptitle(title)
    return fig


def maxvio_curves(train: list[dict]):
    steps, values = _column(train, "maxvio")
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    _per_block(ax, steps, values, "MaxVio = (max load - mean) / mean")
    ax.plot(steps, [r["maxvio_global"] for r in train if r.get("maxvio")], color="black", linewidth=2,
            label="mean over blocks")
    ax.legend(fontsize=7)
    _block_colorbar(fig, [ax], values.shape[1])
    ax.set_title("expert load balance (MaxVio per MoE block)")
    return fig


def starved_counts(train: list[dict]):
    """Experts below 10% of their block's mean load: step x block counts and their total."""
    steps, counts = _column(train, "starved")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [2, 1]})
    image = top.imshow(counts.T, aspect="auto", cmap="magma_r", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, counts.shape[1] - 0.5, -0.5), vmin=0)
    top.set_yticks(integer_ticks(counts.shape[1], 12))
    top.set_ylabel("MoE block")
    top.set_title("starved experts (load < 0.1 x block mean)")
    fig.colorbar(image, ax=top, label="experts").set_ticks(integer_ticks(int(counts.max()) + 1, 6))
    bottom.plot(steps, counts.sum(axis=1), color="black")
    bottom.set_ylabel("all blocks")
    bottom.set_xlabel("step")
    return fig


def loss_curves(train: list[dict]):
    """Against steps (left) and tokens (right): total and LM loss; the raw MTP cross-entropy next to
    its lambda-weighted term (report eq. 25; a dotted line where lambda switches); the balance loss."""
    fig, axes = plt.subplots(3, 2, figsize=(12, 9), layout="constrained")
    switches = [r for prev, r in zip(train, train[1:]) if r.get("mtp_weight") != prev.get("mtp_weight")]
    for column, x_key in enumerate(("step", "tokens")):
        for row, key, label in ((0, "loss", "loss (total)"), (0, "lm_loss", "lm_loss"),
                                (1, "mtp_ce", "mtp_ce (raw cross-entropy)"),
                                (1, "mtp_loss", "mtp_loss (lambda-weighted)"), (2, "aux_loss", "aux_loss (balance)")):
            points = [(r[x_key], r[key]) for r in train if r.get(key) is not None]
            if points:
                axes[row, column].plot(*zip(*points), label=label)
        for row, ax in enumerate(axes[:, column]):
            for r in switches:
                ax.axvline(r[x_key], color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(x_key)
            ax.set_ylabel("loss")
            if ax.lines:
                ax.legend(fontsize=7)
            if row == 0:
                ax.set_title(f"training loss vs {x_key}")
    if switches:
        axes[1, 0].set_title("dotted: MTP weight lambda switches", fontsize=8)
    return fig


def val_curves(evals: list[dict]):
    """Validation loss and bits per byte per domain, MaxVio of the batch and specialization, vs step."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout="constrained")
    steps = [e["step"] for e in evals]
    domains = sorted({d for e in evals for d in e["val"]})
    for ax, key in ((axes[0, 0], "loss"), (axes[0, 1], "bpb")):
        for domain in domains:
            points = [(e["step"], e["val"][domain][key]) for e in evals if domain in e["val"]]
            ax.plot(*zip(*points), marker="o", markersize=3, label=domain)
        ax.set_ylabel(f"validation {key}")
        ax.legend(fontsize=7)
    for ax, key in ((axes[1, 0], "maxvio_batch"), (axes[1, 1], "specialization")):
        ax.plot(steps, [e.get(key) for e in evals], marker="o", markersize=3, color="black")
        ax.set_ylabel(key)
    for ax in axes.ravel():
        ax.set_xlabel("step")
    fig.suptitle("validation")
    return fig


def specialization_heatmaps(record: dict, blocks: list[int]):
    """One panel per chosen block: domain x expert load of one evaluation, each domain's row
    relative to its mean (the report's Figure 9)."""
    domains = sorted(record["domain_load"])
    cube = _relative(np.array([record["domain_load"][d] for d in domains], dtype=float)[:, blocks])
    experts = cube.shape[-1]
    norm = _norm(cube)
    large = len(blocks) <= 4
    fig, axes = _grid(len(blocks), 4.5 if large else 2.2, 0.35 * len(domains) + 1.0, max_cols=2 if large else 8)
    for ax, block, index in zip(axes, blocks, range(len(blocks))):
        image = ax.imshow(cube[:, index], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        _expert_axis(ax, experts)
        ax.set_yticks(range(len(domains)), domains, fontsize=8 if large else 5)
        ax.set_title(f"block {block}", fontsize=9 if large else 7)
        if not large:
            ax.tick_params(axis="x", labelsize=6)
            ax.xaxis.label.set_size(6)
    fig.colorbar(image, ax=list(axes), label=RELATIVE, shrink=0.8)
    fig.suptitle(f"expert load per validation domain, step {record['step']}")
    return fig


# ------------------------------------------------------------------ ablation overlays (launch.ablate)
def variant_val_loss(curves: dict[str, dict]):
    """One panel per validation domain: validation loss vs step, one line per variant."""
    domains = sorted({d for c in curves.values() for e in c["evals"] for d in e["val"]})
    fig, axes = _grid(len(domains), 4.5, 3.2, max_cols=3)
    for ax, domain in zip(axes, domains):
        for name, c in curves.items():
            points = [(e["step"], e["val"][domain]["loss"]) for e in c["evals"] if domain in e["val"]]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        ax.set_title(domain)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    fig.suptitle("validation loss per domain")
    return fig


def variant_maxvio(curves: dict[str, dict]):
    """MaxVio of the validation batch (report 4.5.2) and of the training steps, one line per variant."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, c in curves.items():
        points = [(e["step"], e["maxvio_batch"]) for e in c["evals"] if e.get("maxvio_batch") is not None]
        if points:
            left.plot(*zip(*points), marker="o", markersize=3, label=name)
        if c["train"]:
            right.plot(*zip(*c["train"]), linewidth=1, label=name)
    for ax, title in ((left, "MaxVio_batch (validation)"), (right, "MaxVio, training steps (mean over blocks)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio")
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def variant_specialization(curves: dict[str, dict]):
    """The report's Figure 9: each variant's (rows) domain x expert load at its last evaluation, for
    the first and the last MoE block (columns)."""
    chosen = {name: c["last_eval"] for name, c in curves.items() if c["last_eval"].get("domain_load")}
    blocks = len(next(iter(next(iter(chosen.values()))["domain_load"].values())))
    columns = sorted({0, blocks - 1})
    fig, axes = plt.subplots(len(chosen), len(columns), figsize=(5 * len(columns) + 1.2, 1.8 * len(chosen) + 1),
                             squeeze=False, layout="constrained")
    cubes = {name: _relative(np.array([e["domain_load"][d] for d in sorted(e["domain_load"])], dtype=float))
             for name, e in chosen.items()}
    norm = _norm(np.concatenate([c.ravel() for c in cubes.values()]))
    for row, (name, cube) in enumerate(cubes.items()):
        domains = sorted(chosen[name]["domain_load"])
        for ax, block in zip(axes[row], columns):
            image = ax.imshow(cube[:, block], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            _expert_axis(ax, cube.shape[-1])
            ax.set_yticks(range(len(domains)), domains, fontsize=7)
            ax.set_title(f"{name}, block {block}", fontsize=9)
    fig.colorbar(image, ax=list(axes.ravel()), label=RELATIVE, shrink=0.8)
    fig.suptitle("expert load per validation domain, last evaluation")
    return fig


def save(fig, path) -> None:
    """Write a PNG under a temporary name, then rename it into place (the figure is closed)."""
    save_figure_atomic(fig, path, dpi=100)
