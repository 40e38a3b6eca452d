"""Language-modelling evaluation (report 4.3/5.x): mean token loss, perplexity and bits per byte
on held-out text, and multiple-choice accuracy by per-option likelihood.

    python -m launch.evaluate --model RUN_DIR|CHECKPOINT_DIR|HF_DIR --data 'heldout/*.jsonl' \
        [--tokenizer DIR] [--seq-len L] [--stride S] [--choices items.jsonl] [--output FILE] \
        [--packed NAME=DIR ... --max-sequences N] [--ema] \
        [--tasks a,b --include-path configs/eval --num-fewshot K --limit N --batch-size B]

Every document is ``<bos> text``; every text token is scored once, given at most L-1 tokens
before it: documents longer than L go through windows of L tokens advanced by S (default L/2),
each scoring only the tokens the previous window did not. Bits per byte (tokenizer-independent)
= sum of token NLL in nats / (ln 2 x UTF-8 bytes of the texts). A ``--choices`` JSONL line is
``{"context": str, "options": [str, ...], "answer": int}``; the chosen option is the one with the
lowest NLL per UTF-8 byte of the option, given the context.

``--packed NAME=DIR`` scores prepared (packed) sequences as training's validation does
(``launch.evaluation.scoring``): every label of the first ``--max-sequences`` sequences, given the
sequence before it; loss per token and bits per byte (the tokens' UTF-8 bytes).

``--tasks`` runs lm-evaluation-harness tasks (the ``eval`` extra; ``launch.evaluation.lm_eval``) on the
same model, every token scored given at most L-1 tokens before it (the harness's max_length
L-1): its results go into the output under ``tasks`` and the harness's whole JSON into
``lm_eval.json`` beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from launch.checkpointing.model_source import load_model_and_tokenizer
from launch.evaluation.likelihood import evaluate_texts, read_choices, score_choices
from launch.evaluation.scoring import score_packed
from plugins.atomic import write_text_atomic
from plugins.errors import ConfigError, ProjectError
from text_sources.reading import iter_texts, resolve_inputs


def parse_packed(items: list[str]) -> dict[str, str]:
    """``--packed NAME=DIR`` (or ``DIR``, named by its last component)."""
    out = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        if not name or not path or name in out:
            raise ConfigError(f"--packed {item}: expected NAME=DIR with distinct names")
        out[name] = path
    return out


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags' ranges that do not depend on the model, before anything is loaded."""
    for flag, value, least in [("--seq-len", args.seq_len, 2), ("--stride", args.stride, 1),
                               ("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--max-sequences", args.max_sequences, 1),
                               ("--num-fewshot", args.num_fewshot, 0)]:
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: expected at least {least}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run dir, checkpoint dir or HF DeepseekV3 dir")
    parser.add_argument("--data", nargs="+", default=None, help=".jsonl/.json/.parquet/.txt files or globs")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--choices", type=Path, default=None, help="multiple-choice JSONL")
    parser.add_argument("--packed", nargs="+", default=None, help="NAME=DIR prepared (packed) held-out sets")
    parser.add_argument("--max-sequences", type=int, default=None, help="--packed: sequences scored per set "
                        "(default: all)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the run's)")
    parser.add_argument("--ema", action="store_true", help="evaluate a run's EMA of the weights (train.ema)")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max positions)")
    parser.add_argument("--stride", type=int, default=None, help="window advance (default: seq-len / 2)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: RUN_DIR/eval.json for runs)")
    parser.add_argument("--tasks", default=None, help="lm-eval tasks, comma-separated (e.g. arc_easy,hellaswag)")
    parser.add_argument("--include-path", default=None, help="directory of local lm-eval task YAMLs")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval examples per task (for quick checks)")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval sequences per forward")
    args = parser.parse_args(argv)
    try:
        if not args.data and not args.choices and not args.tasks and not args.packed:
            raise ConfigError("give --data (held-out text), --packed (prepared held-out sets), --choices "
                              "(multiple-choice JSONL) and/or --tasks (lm-eval)")
        if args.tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--tasks needs lm-eval: pip install -e '.[eval]'")
        check_flags(args)
        packed = parse_packed(args.packed) if args.packed else None
        data = resolve_inputs(args.data) if args.data else None
        choices = read_choices(args.choices) if args.choices else None
        loaded, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.ema)
        seq_len = args.seq_len or loaded.model.config.max_position_embeddings
        stride = args.stride or max(1, seq_len // 2)
        if not 2 <= seq_len <= loaded.model.config.max_position_embeddings or not 1 <= stride < seq_len:
            raise ConfigError(f"--seq-len {seq_len} / --stride {stride}: expected 2 <= seq-len <= "
                              f"{loaded.model.config.max_position_embeddings} and 1 <= stride < seq-len")
        result = {"model": loaded.description, "tokenizer": str(args.tokenizer or loaded.tokenizer_dir), "seq_len": seq_len, "stride": stride}
        if args.data:
            result["data"] = args.data
            texts = iter_texts([str(path) for path in data], text_field=args.text_field)
            result.update(evaluate_texts(loaded.model, tokenizer, texts, seq_len, stride, sources=data))
        if packed:
            token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64,
                                       device=next(loaded.model.parameters()).device)  # once for every set
            result["packed"] = {name: score_packed(loaded.model, tokenizer, token_bytes, path, args.max_sequences,
                                                   args.batch_size) for name, path in packed.items()}
        if args.choices:
            result["choices"] = {"file": str(args.choices),
                                 **score_choices(loaded.model, tokenizer, choices, seq_len)}
        if args.tasks:
            from launch.evaluation.lm_eval import evaluate_tasks

            harness = evaluate_tasks(loaded, tokenizer, args.tasks.split(","), args.include_path, args.num_fewshot,
                                     args.limit, args.batch_size, max_length=seq_len - 1)
            result["tasks"] = harness["results"]
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    output = args.output or (loaded.run_dir / "eval.json" if loaded.run_dir else None)
    if output is None:
        return 0
    files = [(output, result)] + ([(output.parent / "lm_eval.json", harness)] if args.tasks else [])
    for path, content in files:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(content, indent=2))
        except OSError as error:  # a full disk, read-only storage: the result is on stdout all the same
            print(f"error: could not record the result in {path} ({error.strerror or error}); it is printed above",
                  file=sys.stderr)
            return 2
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
