"""Needle in a haystack (report 4.3, figure 8): a random passphrase is hidden at a given depth of a
prompt of real text of a given length, the model is asked for it, and greedy decoding must repeat
it. Depth 0 puts the needle at the start of the haystack, 1 right before the question; each
(length, depth) cell's score is the fraction of needles retrieved, drawn as a heatmap.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from tqdm import tqdm

from plugins.atomic import save_figure_atomic
from plugins.errors import ConfigError
from plugins.inference.decoding import generate
from tokenizer.load import TokenizerBundle

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
