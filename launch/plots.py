"""Figures shared by the W&B logger and the dashboard CLI (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plugins.atomic import save_figure_atomic  # noqa: E402


def expert_load_heatmap(loads: np.ndarray, step: int):
    """MoE block x expert heatmap of each block's share of routed tokens (uniform = 1/E)."""
    loads = np.asarray(loads, dtype=float)
    share = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, loads.shape[1] * 0.3), max(2.5, loads.shape[0] * 0.5)))
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE block")
    ax.set_title(f"expert load share, step {step} (uniform = {1 / loads.shape[1]:.3f})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def loss_curves(records: list[dict]):
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "lm_loss", "mtp_loss"):
        ax.plot(steps, [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    return fig


def maxvio_curves(records: list[dict]):
    steps = [r["step"] for r in records]
    per_layer = np.array([r["maxvio"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in range(per_layer.shape[1]):
        ax.plot(steps, per_layer[:, layer], label=f"MoE block {layer}", alpha=0.8)
    ax.plot(steps, [r["maxvio_global"] for r in records], label="global", color="black", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio = (max load - mean) / mean")
    ax.legend(fontsize=7)
    ax.set_title("expert load balance")
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Write a PNG under a temporary name, then rename it into place."""
    save_figure_atomic(fig, path, dpi=100)
