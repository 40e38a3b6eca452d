"""Render a run's PNG plots without W&B (the same figures the logger sends to W&B as images).

    python -m launch.dashboard RUN_DIR      # writes RUN_DIR/plots/*.png and prints each path

From ``RUN_DIR/metrics.jsonl``: loss curves vs step and vs tokens (LM, raw MTP cross-entropy next
to its lambda-weighted term, balance loss), per-block expert load over time (all blocks as small
panels; beyond 8 blocks also the 4 least balanced, large), load-share and router-bias min/max/std
per block, starved experts, MaxVio, the last step's block x expert load; and from the evaluation
records validation loss/BPB per domain and the last evaluation's domain x expert load per block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.reporting.figures import render
from plugins.errors import ProjectError


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
