"""Render a run's PNG plots without W&B: loss curves, MaxVio per MoE block, expert-load heatmap.

    python -m launch.dashboard RUN_DIR      # writes RUN_DIR/plots/{loss,maxvio,expert_load}.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plugins.errors import ProjectError

from . import plots

PLOTTED = ("step", "loss", "lm_loss", "mtp_loss")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ProjectError(f"{path}: no metrics (is {run_dir} a run directory?)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProjectError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ProjectError(f"{path}: line {number}: invalid JSON") from None
            if not isinstance(record, dict) or not all(_is_number(record.get(key)) for key in PLOTTED):
                raise ProjectError(f"{path}: line {number}: expected an object with numbers {', '.join(PLOTTED)}")
            records.append(record)
    if not records:
        raise ProjectError(f"{path}: empty")
    return records


def render(run_dir: Path) -> list[Path]:
    records = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [out / "loss.png"]
    plots.save(plots.loss_curves(records), written[0])
    with_loads = [r for r in records if "expert_load" in r]
    if with_loads:
        plots.save(plots.maxvio_curves(with_loads), out / "maxvio.png")
        last = with_loads[-1]
        plots.save(plots.expert_load_heatmap(last["expert_load"], last["step"]), out / "expert_load.png")
        written += [out / "maxvio.png", out / "expert_load.png"]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        written = render(args.run_dir)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
