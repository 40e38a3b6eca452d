"""Run metrics on rank 0: ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step, and one per
evaluation, told apart by ``loss`` / ``val``) and Weights & Biases with the same values, grouped as
train/, val/, moe/, perf/ and data/ (a mixture's tokens and epoch per source), ``train/step`` and
``train/tokens`` on every row so either is an x-axis, plus the dashboard's figures as images every
``heatmap_interval`` steps (``launch.reporting.figures``, from a bounded history kept here).

W&B runs online only when asked to (or, in ``auto`` mode, when ``WANDB_API_KEY`` is set) and falls
back to offline if the service cannot be reached, so a run never waits on the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from launch.reporting import plots
from launch.reporting.figures import figures
from launch.reporting.run_records import History
from plugins.atomic import write_text_atomic

TRAIN_KEYS = ("loss", "lm_loss", "mtp_loss", "mtp_ce", "aux_loss", "lr", "grad_norm", "batch_size", "mtp_weight",
              "bias_update_speed")
PER_BLOCK = ("load_min", "load_max", "load_std", "bias_min", "bias_max", "bias_std", "starved")
GROUPS = ("train", "val", "moe", "perf", "data")


def define_metrics(run) -> None:
    """Charts open grouped as train/, val/, moe/, perf/, data/, plotted against ``train/step``."""
    run.define_metric("train/step")
    run.define_metric("train/tokens", step_metric="train/step")
    for group in GROUPS:
        run.define_metric(f"{group}/*", step_metric="train/step")


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
            kept = self._kept(resume_step)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        id_file = run_dir / "wandb_run_id"
        resume_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.wandb = _wandb_run(run_dir, mode, project, config, resume_id)
        if self.wandb is not None:
            write_text_atomic(id_file, self.wandb.id)
            define_metrics(self.wandb)
        self.history = History()  # what the W&B figures show (a resumed run's start: in metrics.jsonl)
        self.file = self.path.open("a")

    def _kept(self, resume_step: int) -> list[str]:
        """The lines of steps up to ``resume_step``; a line a crash or a full disk cut short is dropped
        with one line saying so."""
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if step <= resume_step:
                kept.append(line)
        if torn:
            print(f"note: {self.path}: dropped {torn} line(s) that are not a whole record (a write cut short)",
                  flush=True)
        return kept

    def _write(self, record: dict) -> None:
        """One line of metrics.jsonl; storage that refuses it (a full disk) is one warning, and the run
        goes on without the file (a save on that storage fails next, naming the last good checkpoint)."""
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            print(f"warning: {self.path}: cannot write ({error.strerror or error}); steps from {record['step']} "
                  "are not recorded there", file=sys.stderr, flush=True)
            file, self.file = self.file, None
            with contextlib.suppress(OSError):  # the rest of the line, still buffered
                file.close()

    def log(self, record: dict, loads: np.ndarray | None) -> None:
        if loads is not None:
            record["expert_load"] = loads.tolist()
        self._write(record)
        shares = self.history.add_train(record, loads)
        if self.wandb is None:
            return
        step = record["step"]
        flat = {f"train/{k}": record[k] for k in TRAIN_KEYS if record.get(k) is not None}
        flat["train/step"], flat["train/tokens"] = step, record["tokens"]
        flat["perf/tokens_per_s"] = record["tokens_per_s"]
        flat["perf/step_seconds"] = record["step_seconds"]
        for key in ("peak_memory_mb", "rank_step_seconds_max", "rank_step_seconds_min", "slowest_rank"):
            if key in record:  # the busy time of the slowest and fastest rank (launch.training.stragglers)
                flat[f"perf/{key}"] = record[key]
        if "skipped_steps" in record:  # train.spike
            flat["train/skipped_steps"] = record["skipped_steps"]
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
            for key in PER_BLOCK:
                for layer, value in enumerate({**record, **shares}.get(key) or []):
                    flat[f"moe/{key}/block_{layer}"] = value
            if step % self.heatmap_interval == 0 or step == 1:
                flat.update(self._images())
        self.wandb.log(flat, step=step)

    def _images(self) -> dict:
        """The dashboard's figures of the history so far (train/ and moe/ sections)."""
        import wandb

        out = {}
        for name, figure in figures(History(self.history.train, self.history.loads, [])):
            key = "moe/expert_load_heatmap" if name == "expert_load" else \
                f"train/{name}_curves" if name == "loss" else f"moe/{name}"
            out[key] = wandb.Image(figure)
            plots.plt.close(figure)
        return out

    def log_eval(self, record: dict) -> None:
        """One evaluation record (``step``, ``tokens``, ``val: {domain: {loss, bpb, tokens}}``,
        ``maxvio_batch``, ``specialization``, their per-block lists, ``domain_load``): a line of
        metrics.jsonl; W&B ``val/<domain>/loss|bpb``, ``val/maxvio_batch``, ``val/specialization`` and
        one domain x expert heatmap per MoE block, ``val/specialization/block_i``."""
        self._write(record)
        self.history.add_eval(record)
        if self.wandb is None:
            return
        import wandb

        flat = {"train/step": record["step"], "train/tokens": record["tokens"],
                "val/maxvio_batch": record["maxvio_batch"], "val/specialization": record["specialization"]}
        for domain, values in record["val"].items():
            flat[f"val/{domain}/loss"], flat[f"val/{domain}/bpb"] = values["loss"], values["bpb"]
        if record.get("domain_load"):
            blocks = len(next(iter(record["domain_load"].values())))
            for block in range(blocks):
                figure = plots.specialization_heatmaps(record, [block])
                flat[f"val/specialization/block_{block}"] = wandb.Image(figure)
                plots.plt.close(figure)
        self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
