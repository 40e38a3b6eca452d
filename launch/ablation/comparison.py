"""The comparison of an ablation study's variants, in the shape of the report's Tables 5-6 (one
column per variant; validation loss and bits per byte per domain, MaxVio of the batch,
specialization, final train loss, throughput) and Figure 9 (overlaid curves, each variant's
domain x expert load): ``comparison.md``, ``comparison.json`` and ``plots/``, written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from launch.reporting import plots
from launch.reporting.run_records import read_records
from plugins.atomic import write_text_atomic
from plugins.errors import ProjectError


def summarize(run_dir: Path) -> dict:
    """One variant: the last evaluation's values and the train records' final loss and mean tokens/s
    (the first logged step, which holds the start-up, left out when there are others); the
    evaluation and MaxVio curves for the plots."""
    train, evals = [], []
    for kind, record in read_records(run_dir / "metrics.jsonl"):
        if kind == "eval":
            evals.append(record)
        else:
            train.append({k: record.get(k) for k in ("step", "tokens", "loss", "tokens_per_s", "maxvio_global")})
    if not train:
        raise ProjectError(f"{run_dir / 'metrics.jsonl'}: no train records")
    speeds = [r["tokens_per_s"] for r in (train[1:] or train) if r.get("tokens_per_s") is not None]
    last = evals[-1] if evals else {}
    return {
        "steps": train[-1]["step"], "tokens": train[-1]["tokens"], "train_loss": train[-1]["loss"],
        "tokens_per_s": float(np.mean(speeds)) if speeds else None,
        "eval_step": last.get("step"),
        "val": {d: {"loss": v["loss"], "bpb": v["bpb"]} for d, v in last.get("val", {}).items()},
        "maxvio_batch": last.get("maxvio_batch"), "specialization": last.get("specialization"),
        "curves": {"train": [(r["step"], r["maxvio_global"]) for r in train if r.get("maxvio_global") is not None],
                   "evals": [{k: e.get(k) for k in ("step", "val", "maxvio_batch")} for e in evals],
                   "last_eval": last},
    }


def _cell(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def rows(summaries: dict[str, dict]) -> list[tuple[str, list]]:
    """(metric, value per variant) in the table's order; missing values are None."""
    domains = sorted({d for s in summaries.values() for d in s["val"]})
    out = []
    for domain in domains:
        for key, label in (("loss", "loss"), ("bpb", "BPB")):
            out.append((f"val {domain} {label}", [s["val"].get(domain, {}).get(key) for s in summaries.values()]))
    for key, label in (("maxvio_batch", "MaxVio_batch"), ("specialization", "specialization"),
                       ("eval_step", "evaluated at step"), ("train_loss", "final train loss"),
                       ("tokens_per_s", "tokens/s (mean)"), ("steps", "steps"), ("tokens", "tokens")):
        out.append((label, [s[key] for s in summaries.values()]))
    return out


def markdown(summaries: dict[str, dict]) -> str:
    names = list(summaries)
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, values in rows(summaries):
        digits = 0 if label.startswith("tokens/s") else 4
        lines.append(f"| {label} | " + " | ".join(_cell(v, digits) for v in values) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(root: Path, variants: list[tuple[str, Path]]) -> list[Path]:
    """Summaries of every variant's run dir -> the table (Markdown, JSON) and the overlay plots."""
    summaries = {name: summarize(run_dir) for name, run_dir in variants}
    root.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(root / "comparison.md", markdown(summaries)),
               write_text_atomic(root / "comparison.json", json.dumps(
                   {name: {k: v for k, v in s.items() if k != "curves"} for name, s in summaries.items()}, indent=1))]
    curves = {name: s["curves"] for name, s in summaries.items()}
    out = root / "plots"
    out.mkdir(exist_ok=True)
    figures = [("maxvio", plots.variant_maxvio(curves))]
    if any(c["evals"] for c in curves.values()):
        figures.insert(0, ("val_loss", plots.variant_val_loss(curves)))
    if any(c["last_eval"].get("domain_load") for c in curves.values()):
        figures.append(("specialization", plots.variant_specialization(curves)))
    for name, figure in figures:
        plots.save(figure, out / f"{name}.png")
        written.append(out / f"{name}.png")
    return written
