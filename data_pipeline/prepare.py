"""Build a packed dataset: text -> FIM -> tokens -> random token splitting -> packing.

    python -m data_pipeline.prepare --input 'corpus/*.jsonl' --tokenizer tok/ --seq-len 4096 --output data/

Output (written under a temporary name, renamed into place when complete):
``tokens-NNNNN.npy`` shards of [sequences, L] token ids (uint16/uint32, memory-mappable, padded
with the tokenizer's pad id), ``pieces.npy`` (one row per placed document piece: sequence, start,
length, document, offset in the document) and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from plugins.atomic import check_output_dir, staged_directory
from plugins.errors import ProjectError

from .layout import FORMAT_VERSION, MANIFEST, PIECES, shard_name, token_dtype
from .packing import PACKERS, Packing
from .sources import SourceStats, iter_texts

BATCH_DOCUMENTS = 256
SHARD_BYTES = 256 << 20
DEFAULT_SPLIT_RATE = 0.1


class PrepareError(ProjectError):
    """A request that cannot be prepared; one line naming the option or file."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help=".jsonl/.json/.parquet/.txt files or globs")
    source.add_argument("--dataset", metavar="NAME", help="a HF hub dataset name (needs hub access)")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a directory from `python -m tokenizer.train`")
    parser.add_argument("--seq-len", required=True, type=int, help="window length L (DeepSeek-V3: 4096)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--fim-rate", type=float, default=0.1, help="documents given FIM, PSM order (report: 0.1)")
    parser.add_argument("--split-rate", type=float, default=DEFAULT_SPLIT_RATE,
                        help="probability of splitting each punctuation+line-break token (the report gives no "
                             f"number; default {DEFAULT_SPLIT_RATE})")
    parser.add_argument("--packing", choices=sorted(PACKERS), default="best-fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed rows, counting them in the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if args.seq_len < 2:
        raise PrepareError(f"--seq-len {args.seq_len}: must be at least 2")
    for name in ("fim_rate", "split_rate"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise PrepareError(f"--{name.replace('_', '-')} {value}: must be in [0, 1]")
    if args.workers is not None and args.workers < 1:
        raise PrepareError(f"--workers {args.workers}: must be at least 1")
    check_output_dir(args.output, args.overwrite)


def _write_sequences(tmp: Path, packing: Packing, documents: np.memmap, doc_start: np.ndarray,
                     seq_len: int, dtype: np.dtype, pad_id: int) -> list[str]:
    """Scatter every piece into its row, one memory-mapped shard and a few MB of rows at a time."""
    rows_per_shard = max(1, SHARD_BYTES // (seq_len * dtype.itemsize))
    rows_per_block = max(1, (1 << 22) // seq_len)
    names = []
    for shard, first_row in enumerate(tqdm(range(0, packing.num_sequences, rows_per_shard), desc="writing shards",
                                           unit="shard", disable=None)):
        rows = min(rows_per_shard, packing.num_sequences - first_row)
        name = shard_name(shard)
        out = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=(rows, seq_len))
        flat = out.reshape(-1)
        flat[:] = pad_id
        for block in range(first_row, first_row + rows, rows_per_block):
            lo, hi = np.searchsorted(packing.sequence, [block, min(block + rows_per_block, first_row + rows)])
            length = packing.length[lo:hi]
            within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
            source = np.repeat(doc_start[packing.document[lo:hi]] + packing.doc_offset[lo:hi], length) + within
            target = np.repeat((packing.sequence[lo:hi] - first_row) * seq_len + packing.start[lo:hi], length)
            flat[target + within] = documents[source]
        out.flush()
        del out, flat
        names.append(name)
    return names


def prepare(args: argparse.Namespace) -> dict:
    from tokenizer.load import load_tokenizer_dir

    from .encode import DocumentEncoder

    _check(args)
    bundle = load_tokenizer_dir(args.tokenizer).require_pipeline_tokens()
    dtype = token_dtype(bundle.vocab_size)
    encoder = DocumentEncoder(bundle, args.fim_rate, args.split_rate, args.seed)
    stats = SourceStats()
    texts = iter_texts(args.input, args.dataset, args.dataset_config, args.split, args.text_field,
                       skip_bad=args.skip_bad, stats=stats)
    with staged_directory(args.output) as tmp:
        return _prepare_into(tmp, args, bundle, dtype, encoder, stats, texts)


def _prepare_into(tmp, args, bundle, dtype, encoder, stats, texts) -> dict:
    start_time = time.perf_counter()
    lengths: list[int] = []
    fim_documents = split_tokens = 0
    documents_path = tmp / "documents.tmp"
    with documents_path.open("wb") as documents_file, tqdm(desc="tokenizing", unit="doc", disable=None) as bar:
        batch: list[str] = []

        def flush() -> None:
            nonlocal fim_documents, split_tokens
            for doc in encoder.encode(batch, first_index=len(lengths)):
                doc.ids.astype(dtype).tofile(documents_file)
                lengths.append(doc.ids.size)
                fim_documents += doc.fim
                split_tokens += doc.split_tokens
            bar.update(len(batch))
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) == BATCH_DOCUMENTS:
                flush()
        if batch:
            flush()
    if not lengths:
        source = args.dataset or " ".join(args.input)
        raise PrepareError(f"{source}: no non-empty text found in field {args.text_field!r}")
    tokenize_seconds = time.perf_counter() - start_time

    length_array = np.asarray(lengths, dtype=np.int64)
    pack_start = time.perf_counter()
    packing = PACKERS[args.packing](length_array, args.seq_len)
    pack_seconds = time.perf_counter() - pack_start
    documents = np.memmap(documents_path, dtype=dtype, mode="r")
    doc_start = np.cumsum(length_array) - length_array
    shards = _write_sequences(tmp, packing, documents, doc_start, args.seq_len, dtype, bundle.pad_id)
    del documents
    documents_path.unlink()
    pieces = np.stack([packing.sequence, packing.start, packing.length, packing.document, packing.doc_offset], 1)
    np.save(tmp / PIECES, pieces.astype(np.int64))

    tokens = int(length_array.sum())
    manifest = {
        "format_version": FORMAT_VERSION,
        "documents": len(lengths),
        "tokens": tokens,
        "sequences": packing.num_sequences,
        "padding_tokens": packing.num_sequences * args.seq_len - tokens,
        "truncated_documents": packing.truncated_documents,
        "fim_documents": fim_documents,
        "split_tokens": split_tokens,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "packing": args.packing,
        "fim_rate": args.fim_rate,
        "split_rate": args.split_rate,
        "dtype": dtype.name,
        "pad_id": bundle.pad_id,
        "vocab_size": bundle.vocab_size,
        "tokenizer": {"fingerprint": bundle.fingerprint, "path": str(bundle.directory)},
        "inputs": [args.dataset] if args.dataset else [str(p) for p in _resolved(args.input)],
        "text_bytes": stats.bytes,
        "empty_documents": stats.empty_documents,
        "skipped_bad_rows": stats.skipped,
        "skipped_examples": stats.skipped_examples,
        "shards": shards,
        "seconds": {"tokenize": round(tokenize_seconds, 3), "pack": round(pack_seconds, 3),
                    "total": round(time.perf_counter() - start_time, 3)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _resolved(patterns: list[str]) -> list[Path]:
    from .sources import resolve_inputs

    return resolve_inputs(patterns)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers is not None:
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    try:
        manifest = prepare(args)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    fill = manifest["tokens"] / max(1, manifest["sequences"] * manifest["seq_len"])
    print(f"documents {manifest['documents']}  tokens {manifest['tokens']}  sequences {manifest['sequences']} "
          f"x {manifest['seq_len']}  fill {fill:.2%}")
    print(f"truncated documents {manifest['truncated_documents']}  FIM documents {manifest['fim_documents']}  "
          f"split tokens {manifest['split_tokens']}  skipped rows {manifest['skipped_bad_rows']}")
    print(f"wrote {args.output}/ ({len(manifest['shards'])} token shard(s), pieces.npy, manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
