"""Run an ablation study: variants of one base config (same data and seed), one after another
through the real launcher, then a comparison table and overlay plots (report 4.5: Tables 5-6,
Figure 9).

    python -m launch.ablate STUDY.yaml

A study file::

    config: configs/tiny.yaml          # the base run config (paths relative to the current directory)
    run_root: runs/ablations/balance   # each variant runs in RUN_ROOT/<name>
    steps: 300                         # optional: --steps of every run (default: the config's total_tokens)
    launch: [deepspeed, --num_gpus, "8"]   # optional: the launcher prefix (default: one plain process)
    set: [train.wandb_mode=offline]    # optional: --set overrides common to every variant
    variants:
      - {name: aux_free, set: [model.aux_loss_alpha=0.0]}
      - {name: seq_aux, set: [model.aux_loss_alpha=0.01]}

Resumable: a variant whose run finished (``ablation_done.json`` at the study's steps) is not run
again, one with a checkpoint (a preempted one: its launcher exited 0 short of the steps, which stops
the study with one line) resumes with ``--resume``; Ctrl-C stops the running variant's launcher
and exits 130 with one line naming the variant, and the same command again goes on. Writes
``RUN_ROOT/comparison.{md,json}`` and ``RUN_ROOT/plots/*.png`` (``launch.ablation.comparison``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.ablation.study import load_study, run_variant, state
from plugins.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.ablate", description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study YAML")
    args = parser.parse_args(argv)

    running = None  # (name, run dir) of the variant under way

    def body() -> int:
        nonlocal running
        from launch.ablation.comparison import write_comparison

        study = load_study(args.study)
        for variant in study.variants:
            running = variant.name, study.run_dir(variant)
            print(f"variant {variant.name}: {state(study, variant)} -> {study.run_dir(variant)}", flush=True)
            print(f"variant {variant.name}: {run_variant(study, variant)}", flush=True)
        running = None
        for path in write_comparison(Path(study.run_root), [(v.name, study.run_dir(v)) for v in study.variants]):
            print(f"wrote {path}")
        return 0

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        where = f" variant {running[0]} ({running[1]})" if running else ""
        print(f"error: interrupted{where}; rerun the same command to go on (finished variants are skipped, an "
              "interrupted one resumes from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
