"""Run metrics on rank 0: ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step) and Weights &
Biases with the same values, grouped as train/, moe/, perf/ and data/ (a mixture's tokens and epoch
per source), plus the expert-load heatmap.

W&B runs online only when asked to (or, in ``auto`` mode, when ``WANDB_API_KEY`` is set) and falls
back to offline if the service cannot be reached, so a run never waits on the network.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from plugins.atomic import write_text_atomic

from . import plots

TRAIN_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "batch_size", "mtp_weight",
              "bias_update_speed")


def _wandb_run(run_dir: Path, mode: str, project: str, config: dict, resume_id: str | None):
    if mode == "disabled":
        return None
    import wandb

    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    kwargs = dict(project=project, dir=str(run_dir), config=config, id=resume_id, resume="allow" if resume_id else None)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
    except Exception as error:  # the service is unreachable: keep the run going, offline
        if mode == "offline":
            raise
        warnings.warn(f"W&B online init failed ({error}); logging offline under {run_dir}/wandb", stacklevel=2)
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, mode: str, project: str, heatmap_interval: int,
                 resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.heatmap_interval = heatmap_interval
        kept = []  # a fresh run starts the file anew (a dead run's rows before its first checkpoint go)
        if resume_step is not None and self.path.is_file():  # drop what the resumed steps will log again
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        id_file = run_dir / "wandb_run_id"
        resume_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.wandb = _wandb_run(run_dir, mode, project, config, resume_id)
        if self.wandb is not None:
            write_text_atomic(id_file, self.wandb.id)
        self.file = self.path.open("a")

    def log(self, record: dict, loads: np.ndarray | None) -> None:
        if loads is not None:
            record["expert_load"] = loads.tolist()
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is None:
            return
        step = record["step"]
        flat = {f"train/{k}": record[k] for k in TRAIN_KEYS if k in record}
        flat["train/tokens"] = record["tokens"]
        flat["perf/tokens_per_s"] = record["tokens_per_s"]
        flat["perf/step_seconds"] = record["step_seconds"]
        if "peak_memory_mb" in record:
            flat["perf/peak_memory_mb"] = record["peak_memory_mb"]
        for key in ("ep_destinations_mean", "ep_destinations_max", "ep_destination_nodes_mean", "ep_destination_nodes_max"):
            if key in record:
                flat[f"moe/{key}"] = record[key]
        for key, group in (("source_tokens", "tokens"), ("source_epochs", "epoch")):  # a data.sources mixture
            for name, value in record.get(key, {}).items():
                flat[f"data/{group}/{name}"] = value
        if loads is not None:
            flat["moe/maxvio_global"] = record["maxvio_global"]
            for layer, value in enumerate(record["maxvio"]):
                flat[f"moe/maxvio/block_{layer}"] = value
            if step % self.heatmap_interval == 0 or step == 1:
                import wandb

                figure = plots.expert_load_heatmap(loads, step)
                flat["moe/expert_load_heatmap"] = wandb.Image(figure)
                plots.plt.close(figure)
        self.wandb.log(flat, step=step)

    def log_eval(self, record: dict) -> None:
        """A validation record (``launch.validation``): its own line, W&B under val/."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is None:
            return
        flat = {f"val/{name}/{key}": value[key] for name, value in record["val"].items() for key in ("loss", "bpb")}
        flat["val/maxvio_batch"] = record["maxvio_batch"]
        flat["val/specialization"] = record["specialization"]
        self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
