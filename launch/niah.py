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
import random
import sys
from pathlib import Path

from tqdm import tqdm

from data_pipeline.sources import iter_texts
from plugins.atomic import save_figure_atomic, write_text_atomic
from plugins.errors import ConfigError, ProjectError
from plugins.inference.decoding import generate
from tokenizer.load import TokenizerBundle

from .model_source import load_model_and_tokenizer

NEEDLE = "\nThe secret passphrase is {}.\n"
QUESTION = "\nWhat is the secret passphrase? The secret passphrase is"


def builtin_haystack() -> list[str]:
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]


def build_prompt(haystack: list[int], tokenizer: TokenizerBundle, length: int, depth: float, secret: str,
                 offset: int) -> list[int]:
    """``<bos>`` + haystack tokens with the needle at ``depth`` + the question: ``length`` tokens."""
    needle, question = tokenizer.encode(NEEDLE.format(secret)), tokenizer.encode(QUESTION)
    room = length - 1 - len(needle) - len(question)
    if room < 1:
        raise ConfigError(f"--lengths {length}: too short for the needle and the question "
                          f"({len(needle) + len(question) + 1} tokens)")
    if room > len(haystack):
        raise ConfigError(f"--lengths {length}: the haystack has only {len(haystack)} tokens")
    start = offset % (len(haystack) - room + 1)
    filler = haystack[start : start + room]
    cut = round(depth * room)
    return [tokenizer.bos_id, *filler[:cut], *needle, *filler[cut:], *question]


def run_niah(model, tokenizer: TokenizerBundle, haystack: list[int], lengths: list[int], depths: list[float],
             trials: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cells = []
    with tqdm(total=len(lengths) * len(depths) * trials, desc="needle in a haystack", file=sys.stderr,
              disable=None) as progress:
        for length in lengths:
            for depth in depths:
                found = 0
                for _ in range(trials):
                    secret = str(rng.randrange(10000, 100000))
                    prompt = build_prompt(haystack, tokenizer, length, depth, secret, rng.randrange(len(haystack)))
                    answer = tokenizer.decode(generate(model, prompt, len(tokenizer.encode(" " + secret)) + 2).tokens)
                    found += secret in answer
                    progress.update()
                cells.append({"length": length, "depth": depth, "score": found / trials})
    return cells


def plot(cells: list[dict], lengths: list[int], depths: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[next(c["score"] for c in cells if c["length"] == n and c["depth"] == d) for n in lengths]
                     for d in depths])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * len(lengths)), 1.5 + 0.6 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=7)
    fig.colorbar(image, ax=ax, label="retrieval score")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


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
