"""Tokenizer CLI vs calling the ``tokenizers`` trainer directly on the same input: training wall
time and peak memory (each in its own process), encode throughput and held-out bytes/token.

    python benchmarks/tokenizer_train.py --corpus-mb 20 --vocab-size 16384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from common import build_corpus, write_result  # noqa: E402  (benchmarks/ is the script directory, first on sys.path)


def child(mode: str, corpus: Path, vocab_size: int, output: Path) -> None:
    """Run one training in this process and print its time and peak RSS as JSON."""
    start = time.perf_counter()
    if mode == "cli":
        from tokenizer.train import main

        assert main(["--input", str(corpus), "--vocab-size", str(vocab_size), "--output", str(output)]) == 0
    else:
        from tokenizer.bpe_hf import train_byte_level_bpe
        from tokenizer.special_tokens import SpecialTokens

        def texts():
            with corpus.open(encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)["text"]

        train_byte_level_bpe(texts(), vocab_size, SpecialTokens()).save(str(output / "tokenizer.json"))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def run_child(mode: str, corpus: Path, vocab_size: int, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--vocab-size", str(vocab_size),
         "--child-output", str(output)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--output", default="benchmarks/results/tokenizer_train.json")
    parser.add_argument("--child", choices=["cli", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.corpus, args.vocab_size, args.child_output)
        return

    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus_bytes = build_corpus(tmp / "corpus.jsonl", args.corpus_mb)
        direct = run_child("direct", tmp / "corpus.jsonl", args.vocab_size, tmp / "direct")
        cli = run_child("cli", tmp / "corpus.jsonl", args.vocab_size, tmp / "cli")
        report = dict(line.split(": ", 1) for line in (tmp / "cli" / "report.txt").read_text().splitlines())
        tokenizer = Tokenizer.from_file(str(tmp / "cli" / "tokenizer.json"))
        texts = [json.loads(line)["text"] for line in (tmp / "corpus.jsonl").open(encoding="utf-8")]
        start = time.perf_counter()
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        encode_seconds = time.perf_counter() - start

    result = {
        "corpus_bytes": corpus_bytes,
        "vocab_size": args.vocab_size,
        "direct_trainer": direct,
        "cli": cli,
        "time_ratio": cli["seconds"] / direct["seconds"],
        "memory_ratio": cli["peak_mb"] / direct["peak_mb"],
        "encode_mb_per_s": corpus_bytes / encode_seconds / 2**20,
        "corpus_bytes_per_token": corpus_bytes / tokens,
        "heldout_bytes_per_token": float(report["heldout_bytes_per_token"]),
        "split_table_entries": int(report["split_table_entries"]),
    }
    print(f"tokenizer training on {corpus_bytes / 2**20:.1f} MB (stdlib code + docs), vocab {args.vocab_size}")
    print(f"{'':<24}{'seconds':>10}{'peak MB':>10}")
    print(f"{'tokenizers directly':<24}{direct['seconds']:>10.2f}{direct['peak_mb']:>10.0f}")
    print(f"{'tokenizer.train CLI':<24}{cli['seconds']:>10.2f}{cli['peak_mb']:>10.0f}")
    print(f"{'CLI / direct':<24}{result['time_ratio']:>9.2f}x{result['memory_ratio']:>9.2f}x")
    print(f"encode throughput       {result['encode_mb_per_s']:.1f} MB/s (encode_batch, all cores)")
    print(f"bytes/token             {result['heldout_bytes_per_token']:.3f} held-out, "
          f"{result['corpus_bytes_per_token']:.3f} training corpus")
    write_result(args.output, result)


if __name__ == "__main__":
    main()
