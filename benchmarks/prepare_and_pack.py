"""Data pipeline on a real corpus: best-fit vs concat packing (sequences, truncated documents,
padding), end-to-end ``prepare`` throughput vs the tokenizer's raw batch encoding, and packing
time for 1M document lengths. Prints a table, writes JSON.

    python benchmarks/prepare_and_pack.py --corpus-mb 12 --seq-len 4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import build_corpus, write_result  # benchmarks/ is the script directory, first on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--lengths", type=int, default=1_000_000, help="synthetic document count for packing time")
    parser.add_argument("--output", default="benchmarks/results/prepare_and_pack.json")
    args = parser.parse_args()

    from data_pipeline.packing import best_fit_decreasing, concatenate
    from data_pipeline.prepare import main as prepare
    from tokenizer.load import load_tokenizer_dir
    from tokenizer.train import main as train_tokenizer

    result: dict = {"corpus_mb": args.corpus_mb, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        corpus_bytes = build_corpus(corpus, args.corpus_mb)
        result["corpus_bytes"] = corpus_bytes
        assert train_tokenizer(["--input", str(corpus), "--vocab-size", str(args.vocab_size),
                                "--output", str(tmp / "tok"), "--max-bytes", str(8 << 20)]) == 0
        bundle = load_tokenizer_dir(tmp / "tok")
        texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
        start = time.perf_counter()
        bundle.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        result["raw_encode_mb_per_s"] = corpus_bytes / (time.perf_counter() - start) / 2**20
        for packing in ("best-fit", "concat"):
            start = time.perf_counter()
            assert prepare(["--input", str(corpus), "--tokenizer", str(tmp / "tok"), "--seq-len", str(args.seq_len),
                            "--output", str(tmp / packing), "--packing", packing]) == 0
            seconds = time.perf_counter() - start
            manifest = json.loads((tmp / packing / "manifest.json").read_text())
            result[packing] = {
                "seconds": seconds,
                "mb_per_s": corpus_bytes / seconds / 2**20,
                "sequences": manifest["sequences"],
                "truncated_documents": manifest["truncated_documents"],
                "documents": manifest["documents"],
                "padding_fraction": manifest["padding_tokens"] / (manifest["sequences"] * args.seq_len),
            }
    result["sequences_ratio"] = result["best-fit"]["sequences"] / result["concat"]["sequences"]
    result["prepare_vs_raw_encode"] = result["best-fit"]["mb_per_s"] / result["raw_encode_mb_per_s"]

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 1.3, args.lengths).astype(np.int64), 2, 16 * args.seq_len)
    for name, packer in (("best-fit", best_fit_decreasing), ("concat", concatenate)):
        start = time.perf_counter()
        packing = packer(lengths, args.seq_len)
        result[f"pack_1m_{name}"] = {"seconds": time.perf_counter() - start, "sequences": packing.num_sequences,
                                     "truncated_documents": packing.truncated_documents}

    print(f"{result['corpus_bytes'] / 2**20:.1f} MB of stdlib code + docs, L = {args.seq_len}, "
          f"vocab {args.vocab_size}")
    print(f"{'packing':<10}{'sequences':>11}{'truncated':>11}{'padding':>9}{'prepare MB/s':>14}")
    for name in ("best-fit", "concat"):
        r = result[name]
        print(f"{name:<10}{r['sequences']:>11}{r['truncated_documents']:>11}{r['padding_fraction']:>9.3%}"
              f"{r['mb_per_s']:>14.2f}")
    print(f"best-fit / concat sequences: {result['sequences_ratio']:.4f}")
    print(f"raw encode_batch_fast: {result['raw_encode_mb_per_s']:.2f} MB/s; "
          f"prepare (best-fit) / raw encode: {result['prepare_vs_raw_encode']:.2f}x")
    for name in ("best-fit", "concat"):
        r = result[f"pack_1m_{name}"]
        print(f"packing {args.lengths} lengths, {name}: {r['seconds']:.2f} s, {r['sequences']} sequences, "
              f"{r['truncated_documents']} truncated")
    write_result(args.output, result)


if __name__ == "__main__":
    main()
