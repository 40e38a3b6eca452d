"""Needle in a haystack (report 4.3, figure 8): a random passphrase is hidden at a given depth of a
prompt of real text of a given length, the model is asked for it, and greedy decoding must repeat
it. Writes the retrieval score of every (length, depth) cell as JSON and the heatmap PNG.

    python -m launch.niah --model runs/tiny_long_stage2 --lengths 128 256 512 \
        --depths 0 0.25 0.5 0.75 1 [--trials 4] [--haystack 'docs/*.txt'] [--output DIR]

The haystack is Python's own documentation unless ``--haystack`` names files. Depth 0 puts the
needle at the start of the haystack, 1 right before the question.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.checkpointing.model_source import load_model_and_tokenizer
from launch.evaluation.niah import builtin_haystack, plot, run_niah
from plugins.atomic import write_text_atomic
from plugins.errors import ConfigError, ProjectError
from text_sources.reading import iter_texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.niah", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run dir, checkpoint dir or HF DeepseekV3 dir")
    parser.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=4, help="needles per cell")
    parser.add_argument("--haystack", nargs="+", default=None, help="text files (default: Python's documentation)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="directory (default: RUN_DIR/niah)")
    args = parser.parse_args(argv)
    try:
        if args.trials < 1:
            raise ConfigError(f"--trials {args.trials}: expected at least 1")
        for depth in args.depths:
            if not 0 <= depth <= 1:
                raise ConfigError(f"--depths {depth}: expected every depth in [0, 1]")
        loaded, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
        limit = loaded.model.config.max_position_embeddings
        if max(args.lengths) + 8 > limit:
            raise ConfigError(f"--lengths {max(args.lengths)}: the model has {limit} positions")
        output = args.output or (loaded.run_dir / "niah" if loaded.run_dir else None)
        if output is None:
            raise ConfigError(f"{args.model}: a HF directory needs --output DIR")
        texts = iter_texts(args.haystack) if args.haystack else builtin_haystack()
        haystack = [token for text in texts for token in tokenizer.encode(text)]
        if not haystack:
            raise ConfigError(f"--haystack {' '.join(args.haystack)}: no text")
        cells = run_niah(loaded.model, tokenizer, haystack, sorted(args.lengths), args.depths, args.trials, args.seed)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    result = {"model": loaded.description, "trials": args.trials, "seed": args.seed, "cells": cells}
    write_text_atomic(output / "niah.json", json.dumps(result, indent=2))
    plot(cells, sorted(args.lengths), args.depths, output / "niah.png", f"needle in a haystack\n{loaded.description}")
    mean = sum(c["score"] for c in cells) / len(cells)
    print(f"mean retrieval {mean:.2f} over {len(cells)} cells; wrote {output / 'niah.json'} and {output / 'niah.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
