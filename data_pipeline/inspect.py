"""Summarise prepared directories and check that they can be read together (issue 18).

    python -m data_pipeline.inspect DIR [DIR ...] [--validation DIR ...]

Each DIR is a prepared directory, a directory of ``prepare --num-shards`` shards (all must be
present) or a glob of either; every directory is opened and checked (manifest, token files,
piece index). One row per DIR: documents, tokens, sequences, fill, truncated documents, FIM
share, split tokens, seq_len and tokenizer fingerprint; a total row when there are several.
Directories built with different tokenizers or window lengths, which one run cannot mix, are a
one-line error naming both (exit 2). ``--validation``: held-out sets, each reported with how many of
its documents have their exact text in the training DIRs (``dedup``: the document hashes ``prepare``
keeps), a warning when any do.
"""

from __future__ import annotations

import argparse
import sys

from plugins.errors import run_cli

from .catalog import check_compatible, open_prepared, prepared_dirs
from .dedup import duplicates

COLUMNS = ("documents", "tokens", "sequences", "truncated_documents", "fim_documents", "split_tokens")


def summarise(path: str) -> dict:
    """Counts over every prepared directory ``path`` names."""
    datasets = open_prepared(prepared_dirs(path), tokenizer_fingerprint=None)
    manifests = [d.manifest for d in datasets]
    row = {key: sum(m[key] for m in manifests) for key in COLUMNS}
    row.update(path=path, directories=len(datasets), seq_len=manifests[0]["seq_len"],
               tokenizer=manifests[0]["tokenizer"]["fingerprint"], dirs=[d.directory for d in datasets])
    return row


def _line(row: dict) -> str:
    fill = row["tokens"] / max(1, row["sequences"] * row["seq_len"])
    fim = row["fim_documents"] / max(1, row["documents"])
    return (f"{row['path']:<32}{row['directories']:>5}{row['documents']:>11}{row['tokens']:>14}{row['sequences']:>11}"
            f"{fill:>8.2%}{row['truncated_documents']:>11}{fim:>7.1%}{row['split_tokens']:>10}{row['seq_len']:>8}"
            f"  {row['tokenizer'][:12]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="DIR", help="prepared directories, shard parents or globs")
    parser.add_argument("--validation", nargs="+", default=[], metavar="DIR",
                        help="held-out sets to check for documents that are also in the DIRs")
    args = parser.parse_args(argv)

    def body() -> int:
        rows = [summarise(path) for path in args.paths]
        check_compatible([row["dirs"][0] for row in rows])
        print(f"{'source':<32}{'dirs':>5}{'documents':>11}{'tokens':>14}{'sequences':>11}{'fill':>8}"
              f"{'truncated':>11}{'FIM':>7}{'split':>10}{'seq_len':>8}  tokenizer")
        for row in rows:
            print(_line(row))
        if len(rows) > 1:
            total = {key: sum(r[key] for r in rows) for key in (*COLUMNS, "directories")}
            print(_line({**total, "path": "total", "seq_len": rows[0]["seq_len"], "tokenizer": rows[0]["tokenizer"]}))
        training = [directory for row in rows for directory in row["dirs"]]
        for path in args.validation:
            found, total = duplicates(prepared_dirs(path), training)
            print(f"warning: validation {path}: {found} of its {total} documents are also in the training data "
                  "(the same text): their loss is not held out" if found else
                  f"validation {path}: none of its {total} documents is in the training data")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
