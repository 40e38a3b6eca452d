"""Train a byte-level BPE tokenizer with DeepSeek-V3's special tokens and its split table.

    python -m tokenizer.train --input 'corpus/*.jsonl' --vocab-size 128000 --output tok/

Writes ``tokenizer.json`` and ``tokenizer_config.json`` (``transformers.AutoTokenizer`` loads the
directory), ``split_table.json`` (punctuation+line-break tokens -> pieces, report 4.1) and
``report.txt``; with ``--backend sentencepiece`` also ``tokenizer.model``. The directory is
built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from plugins.atomic import check_output_dir, staged_directory
from plugins.errors import ProjectError
from text_sources.reading import SourceStats, iter_texts

from .bpe_hf import BYTE_ALPHABET, train_byte_level_bpe
from .bpe_spm import train_sentencepiece_bpe
from .chunking import bounded_chunks
from .load import fingerprint
from .special_tokens import SpecialTokens, first_twins
from .split_table import build_split_table

HELDOUT_EVERY = 50  # every 50th document goes to the held-out slice until it is full
SMALL_VOCABULARY = 0.9  # warn when the trained vocabulary is below this fraction of the requested size


class TrainError(ProjectError):
    """A request that cannot be trained; one line naming the option."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SpecialTokens()
    parser = argparse.ArgumentParser(prog="python -m tokenizer.train", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help=".jsonl/.json/.parquet/.txt files or globs")
    source.add_argument("--dataset", metavar="NAME", help="a HF hub dataset name (needs hub access)")
    parser.add_argument("--dataset-config", default=None, help="the hub dataset's configuration name")
    parser.add_argument("--split", default="train", help="the hub dataset's split")
    parser.add_argument("--text-field", default="text", help="the field holding the text (JSON/parquet/hub)")
    parser.add_argument("--vocab-size", type=int, required=True, help="DeepSeek-V3 uses 128K")
    parser.add_argument("--output", required=True, type=Path, help="the tokenizer directory to write")
    parser.add_argument("--backend", choices=["tokenizers", "sentencepiece"], default="tokenizers")
    parser.add_argument("--max-bytes", type=int, default=None, help="train on the first N bytes of text only")
    parser.add_argument("--heldout-bytes", type=int, default=1 << 20, help="held-out slice for the compression figure")
    parser.add_argument("--min-frequency", type=int, default=2, help="tokenizers backend: minimum pair count to merge")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    for name, value in defaults.as_dict().items():
        parser.add_argument(f"--{name.replace('_', '-')}-token", dest=f"{name}_token", default=value,
                            help=f"special token string (default {value})")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace, specials: SpecialTokens) -> None:
    minimum = BYTE_ALPHABET + len(specials.as_list()) + (1 if args.backend == "sentencepiece" else 0)
    if args.vocab_size < minimum:
        raise TrainError(f"--vocab-size {args.vocab_size}: must be at least {minimum} "
                         f"(the 256-byte alphabet plus {minimum - BYTE_ALPHABET} special tokens)")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise TrainError(f"--max-bytes {args.max_bytes}: must be positive")
    if args.heldout_bytes < 0:
        raise TrainError(f"--heldout-bytes {args.heldout_bytes}: must be 0 or more")
    if args.min_frequency < 1:
        raise TrainError(f"--min-frequency {args.min_frequency}: must be at least 1")
    check_output_dir(args.output, args.overwrite)


class CorpusSplitter:
    """Streams the corpus into training text and a small held-out slice, counting bytes."""

    def __init__(self, texts: Iterator[str], max_bytes: int | None, heldout_bytes: int):
        self.texts, self.max_bytes, self.heldout_budget = texts, max_bytes, heldout_bytes
        self.heldout: list[str] = []
        self.heldout_bytes = 0
        self.training_bytes = 0
        self.training_documents = 0

    def training_texts(self) -> Iterator[str]:
        with tqdm(total=self.max_bytes, unit="B", unit_scale=True, desc="reading corpus", disable=None) as bar:
            for index, text in enumerate(self.texts):
                size = len(text.encode("utf-8"))
                if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 and self.heldout_bytes + size <= self.heldout_budget:
                    self.heldout.append(text)
                    self.heldout_bytes += size
                    continue
                self.training_bytes += size
                self.training_documents += 1
                bar.update(size)
                yield text
                if self.max_bytes is not None and self.training_bytes >= self.max_bytes:
                    return


def _bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float | None:
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else None


def _tokenizer_config(specials: SpecialTokens) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "additional_special_tokens": [specials.fim_hole, specials.fim_begin, specials.fim_end],
        "fim_tokens": {"hole": specials.fim_hole, "begin": specials.fim_begin, "end": specials.fim_end},
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # transformers, like tokenizer.load: a special token's text stays text
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }


def _special_tokens(args: argparse.Namespace) -> SpecialTokens:
    """The ``--*-token`` flags: each non-empty, no two alike (an id stands for one token)."""
    given = {name: getattr(args, f"{name}_token") for name in SpecialTokens().as_dict()}
    flag = {name: f"--{name.replace('_', '-')}-token" for name in given}
    for name, value in given.items():
        if not value:
            raise TrainError(f"{flag[name]} {value!r}: must be a non-empty string")
    twins = first_twins(given)
    if twins is not None:
        first, second = twins
        raise TrainError(f"{flag[first]} and {flag[second]} are both {given[first]!r}: special tokens must be distinct")
    return SpecialTokens(**given)


def train(args: argparse.Namespace) -> dict:
    specials = _special_tokens(args)
    _check(args, specials)
    stats = SourceStats()
    texts = iter_texts(args.input, args.dataset, args.dataset_config, args.split, args.text_field, stats=stats)
    corpus = CorpusSplitter(texts, args.max_bytes, args.heldout_bytes)
    chunks = bounded_chunks(corpus.training_texts())
    start = time.perf_counter()
    if args.backend == "tokenizers":
        tokenizer, spm_model = train_byte_level_bpe(chunks, args.vocab_size, specials, args.min_frequency), None
    else:
        try:
            tokenizer, spm_model = train_sentencepiece_bpe(chunks, args.vocab_size, specials)
        except RuntimeError as error:  # sentencepiece reports e.g. a vocabulary larger than the corpus allows
            raise TrainError(f"sentencepiece: {str(error).splitlines()[-1]}") from None
    seconds = time.perf_counter() - start
    if corpus.training_documents == 0:
        source = args.dataset or " ".join(args.input)
        raise TrainError(f"{source}: no non-empty text found in field {args.text_field!r}")
    if tokenizer.get_vocab_size() < SMALL_VOCABULARY * args.vocab_size:
        print(f"warning: --vocab-size {args.vocab_size}: the corpus ({corpus.training_bytes} bytes) yields only "
              f"{tokenizer.get_vocab_size()} tokens; train on more text for a vocabulary of that size", file=sys.stderr)

    with staged_directory(args.output) as tmp:
        return _write(tmp, args, tokenizer, spm_model, specials, corpus, stats, seconds)


def _write(tmp: Path, args, tokenizer: Tokenizer, spm_model: bytes | None, specials: SpecialTokens,
           corpus: CorpusSplitter, stats: SourceStats, seconds: float) -> dict:
    tokenizer.save(str(tmp / "tokenizer.json"))
    if spm_model is not None:
        (tmp / "tokenizer.model").write_bytes(spm_model)
    (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(specials), indent=2, ensure_ascii=False))
    table = build_split_table(tokenizer)
    (tmp / "split_table.json").write_text(json.dumps({str(k): v for k, v in table.items()}, indent=0))
    report = {
        "backend": args.backend,
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": args.vocab_size,
        "training_documents": corpus.training_documents,
        "training_bytes": corpus.training_bytes,
        "empty_documents_skipped": stats.empty_documents,
        "training_seconds": round(seconds, 3),
        "heldout_documents": len(corpus.heldout),
        "heldout_bytes": corpus.heldout_bytes,
        "heldout_bytes_per_token": _bytes_per_token(tokenizer, corpus.heldout) if corpus.heldout else None,
        "split_table_entries": len(table),
        "special_tokens": {k: tokenizer.token_to_id(v) for k, v in specials.as_dict().items()},
        "fingerprint": fingerprint(tmp / "tokenizer.json"),
    }
    (tmp / "report.txt").write_text("".join(f"{k}: {v}\n" for k, v in report.items()))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = train(args)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(f"wrote {args.output}/ (tokenizer.json, tokenizer_config.json, split_table.json, report.txt"
          f"{', tokenizer.model' if args.backend == 'sentencepiece' else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
