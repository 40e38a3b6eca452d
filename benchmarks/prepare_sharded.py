"""Sharded, parallel ``prepare`` (issue 18) against the obvious alternative, one process over the
whole corpus: throughput with ``--jobs J`` vs one process, sequences of the sharded result vs one
best-fit pass, and the peak resident memory of one shard job as the corpus grows at a fixed
shard size (and of the one-process run on the same corpora). Prints a table, writes JSON.

    python benchmarks/prepare_sharded.py --corpus-mb 50 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_corpus, write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS = """
import resource, sys
from data_pipeline.prepare import main
assert main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def prepare(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MB of the command's own process) of one ``prepare`` command."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return time.perf_counter() - start, int(result.stdout.split()[-1]) / 1024


def totals(directories: list[Path]) -> dict:
    manifests = [json.loads((d / "manifest.json").read_text()) for d in directories]
    return {key: sum(m[key] for m in manifests) for key in ("documents", "tokens", "sequences")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=12.5, help="shard size of the memory comparison")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--output", default="benchmarks/results/prepare_sharded.json")
    args = parser.parse_args()

    from tokenizer.train import main as train_tokenizer

    result: dict = {"corpus_mb": args.corpus_mb, "jobs": args.jobs, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        result["corpus_bytes"] = build_corpus(corpus, args.corpus_mb)
        assert train_tokenizer(["--input", str(corpus), "--vocab-size", str(args.vocab_size),
                                "--output", str(tmp / "tok"), "--max-bytes", str(8 << 20)]) == 0
        common = ["--tokenizer", str(tmp / "tok"), "--seq-len", str(args.seq_len)]
        runs = {"one process": [], f"--jobs {args.jobs}": ["--jobs", str(args.jobs)]}
        for name, extra in runs.items():
            output = tmp / name.replace(" ", "_")
            seconds, _ = prepare(["--input", str(corpus), *common, "--output", str(output), *extra])
            dirs = sorted(output.glob("shard-*")) or [output]
            result[name] = {"seconds": seconds, "mb_per_s": result["corpus_bytes"] / seconds / 2**20, **totals(dirs)}
        single, sharded = result["one process"], result[f"--jobs {args.jobs}"]
        result["speedup"] = single["seconds"] / sharded["seconds"]
        result["sequences_ratio"] = sharded["sequences"] / single["sequences"]

        memory = {}
        for megabytes in (args.corpus_mb // 2, args.corpus_mb):
            part = tmp / f"corpus{megabytes}.jsonl"
            build_corpus(part, megabytes)
            shards = max(1, round(megabytes / args.shard_mb))
            _, shard_peak = prepare(["--input", str(part), *common, "--output", str(tmp / f"s{megabytes}"),
                                     "--num-shards", str(shards), "--shard-index", "0"])
            _, whole_peak = prepare(["--input", str(part), *common, "--output", str(tmp / f"w{megabytes}")])
            memory[megabytes] = {"shards": shards, "shard_job_peak_mb": shard_peak, "one_process_peak_mb": whole_peak}
        result["memory"] = memory

    print(f"{result['corpus_bytes'] / 2**20:.1f} MB of stdlib code + docs, L = {args.seq_len}, vocab {args.vocab_size}")
    print(f"{'prepare':<14}{'seconds':>9}{'MB/s':>8}{'documents':>11}{'sequences':>11}")
    for name in runs:
        r = result[name]
        print(f"{name:<14}{r['seconds']:>9.1f}{r['mb_per_s']:>8.2f}{r['documents']:>11}{r['sequences']:>11}")
    print(f"--jobs {args.jobs} / one process: {result['speedup']:.2f}x throughput, "
          f"{(result['sequences_ratio'] - 1):+.3%} sequences")
    print(f"{'corpus MB':<11}{'shards':>7}{'shard job peak MB':>19}{'one process peak MB':>21}")
    for megabytes, m in memory.items():
        print(f"{megabytes:<11}{m['shards']:>7}{m['shard_job_peak_mb']:>19.0f}{m['one_process_peak_mb']:>21.0f}")
    write_result(args.output, result)


if __name__ == "__main__":
    main()
