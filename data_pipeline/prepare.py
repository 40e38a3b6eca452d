"""Build a packed dataset: text -> FIM -> tokens -> random token splitting -> packing.

    python -m data_pipeline.prepare --input 'corpus/*.jsonl' --tokenizer tok/ --seq-len 4096 --output data/ \
        [--num-shards N [--shard-index I | --jobs J]]

With ``--num-shards N`` the input is partitioned (``partition``: by file, and by row within JSON
Lines files) and shard I becomes its own complete directory ``OUTPUT/shard-0000I-of-0000N`` with
best-fit packing inside the shard (issue 18): ``--shard-index I`` prepares one (a cluster's array
job), ``--jobs J`` all of them, J processes at a time (``jobs``). A job's memory is bounded by its
shard: document lengths are numpy arrays, tokens go through a file, the tokenizer sees bounded
windows (``encode``).

Output (written under a temporary name, renamed into place when complete; one job at a time per
output, ``plugins.run_lock``, the lock file ``.NAME.lock`` beside it while it runs):
``tokens-NNNNN.npy`` shards of [sequences, L] token ids (uint16/uint32, memory-mappable, padded
with the tokenizer's pad id), ``pieces.npy`` (one row per placed document piece: sequence, start,
length, document, offset in the document), ``document_hashes.npy`` (each document's text hash,
``dedup``) and ``manifest.json``. The manifest's ``content_sha256`` hashes the tokens and pieces (a
resumed run checks that its data did not change) and ``preparation`` the command's inputs and
settings (every shard of one run has the same: the reader refuses shards of other runs side by side).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from plugins.atomic import check_output_dir, staged_directory
from plugins.errors import ProjectError
from plugins.run_lock import DirectoryLock
from text_sources.partition import partition
from text_sources.reading import SourceStats, iter_texts, resolve_inputs
from tokenizer.special_tokens import first_twins

from .dedup import document_hashes
from .layout import DOCUMENT_HASHES, FORMAT_VERSION, MANIFEST, PIECES, shard_dir_name, shard_name, token_dtype
from .packing import PACKERS, Packing
from .staging import remove_stale_temporaries

BATCH_DOCUMENTS = 256
BATCH_CHARS = 1 << 22
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
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer threads per job (default: the cores divided among the jobs)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="partition the input into N shards, each its own directory OUTPUT/shard-I-of-N "
                             "(default: --jobs)")
    parser.add_argument("--shard-index", type=int, default=None,
                        help="prepare only shard I (0-based; one task of an array job); default: every shard")
    parser.add_argument("--jobs", type=int, default=1, help="shards prepared at once, as separate processes")
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed rows, counting them in the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> list[int]:
    """Validate every flag before any work; returns the shard indices this command prepares."""
    if args.seq_len < 2:
        raise PrepareError(f"--seq-len {args.seq_len}: must be at least 2")
    for name in ("fim_rate", "split_rate"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise PrepareError(f"--{name.replace('_', '-')} {value}: must be in [0, 1]")
    for name in ("workers", "num_shards", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PrepareError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.num_shards is None:
        args.num_shards = args.jobs
    if args.shard_index is not None:
        if not 0 <= args.shard_index < args.num_shards:
            raise PrepareError(f"--shard-index {args.shard_index}: must be in [0, --num-shards {args.num_shards})")
        if args.jobs > 1:
            raise PrepareError(f"--jobs {args.jobs}: runs every shard; drop it to prepare only --shard-index "
                               f"{args.shard_index}")
    if args.output.exists() and not args.output.is_dir():
        raise PrepareError(f"--output {args.output}: exists and is not a directory")
    indices = [args.shard_index] if args.shard_index is not None else list(range(args.num_shards))
    for index in indices:
        check_output_dir(shard_output(args, index), args.overwrite)
    return indices


def shard_output(args: argparse.Namespace, index: int) -> Path:
    """Where shard ``index`` goes: ``--output`` itself when unsharded."""
    return args.output if args.num_shards == 1 else args.output / shard_dir_name(index, args.num_shards)


def _check_tokenizer(bundle, args: argparse.Namespace) -> None:
    """The tokens this run inserts: pad always, FIM tokens when --fim-rate > 0, the split table when
    --split-rate > 0 (so a tokenizer without FIM tokens serves --fim-rate 0); no two of them, BOS and
    EOS included, one token (``tokenizer.train``'s check)."""
    config = bundle.directory / "tokenizer_config.json"
    needs = [("pad_token", bundle.pad_id, None)]
    if args.fim_rate > 0:
        needs += [(f"fim_tokens.{k}", getattr(bundle, f"fim_{k}_id"), "--fim-rate 0") for k in ("begin", "hole", "end")]
    for key, value, fix in needs:
        if value is None:
            also = f" (needed by --fim-rate {args.fim_rate}; pass {fix} to prepare without FIM)" if fix else ""
            raise PrepareError(f"{config}: {key} missing{also}")
    inserted = {"bos_token": bundle.bos_id, "eos_token": bundle.eos_id, "pad_token": bundle.pad_id}
    if args.fim_rate > 0:
        inserted.update({f"fim_tokens.{k}": getattr(bundle, f"fim_{k}_id") for k in ("begin", "hole", "end")})
    twins = first_twins(inserted)
    if twins is not None:
        text = bundle.tokenizer.id_to_token(inserted[twins[0]])
        raise PrepareError(f"{config}: {twins[0]} and {twins[1]} are both {text!r}: special tokens must be distinct")
    if args.split_rate > 0 and bundle.split_table is None:
        raise PrepareError(f"{bundle.directory / 'split_table.json'}: missing (needed by --split-rate "
                           f"{args.split_rate}; pass --split-rate 0 or train the tokenizer with `python -m tokenizer.train`)")


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


def prepare(args: argparse.Namespace, progress=None) -> dict:
    """Prepare shard ``args.shard_index`` (or the whole input when unsharded); ``progress(n)`` is
    told of every n documents tokenized (default: a progress bar)."""
    from tokenizer.load import load_tokenizer_dir

    from .encode import DocumentEncoder

    index = args.shard_index or 0
    output = shard_output(args, index)
    bundle = load_tokenizer_dir(args.tokenizer)
    _check_tokenizer(bundle, args)
    dtype = token_dtype(bundle.vocab_size)
    seed = args.seed if args.num_shards == 1 else (args.seed, args.num_shards, index)
    encoder = DocumentEncoder(bundle, args.fim_rate, args.split_rate, seed)
    stats = SourceStats()
    texts = iter_texts(args.input, args.dataset, args.dataset_config, args.split, args.text_field,
                       skip_bad=args.skip_bad, stats=stats, num_shards=args.num_shards, shard_index=index)
    with DirectoryLock(output.with_name(f".{output.name}.lock"), f"--output {output}"):  # one job per output
        remove_stale_temporaries(output)
        with staged_directory(output) as tmp:
            if progress is not None:
                return _prepare_into(tmp, args, bundle, dtype, encoder, stats, texts, progress)
            with tqdm(desc="tokenizing", unit="doc", disable=None) as bar:
                return _prepare_into(tmp, args, bundle, dtype, encoder, stats, texts, bar.update)


def _prepare_into(tmp, args, bundle, dtype, encoder, stats, texts, progress) -> dict:
    start_time = time.perf_counter()
    lengths: list[np.ndarray] = []  # one array per batch: memory per document is 8 bytes
    hashes: list[np.ndarray] = []  # and 8 more for its text's hash
    content = hashlib.sha256()  # of every document's tokens, then the pieces
    documents = fim_documents = split_tokens = 0
    documents_path = tmp / "documents.tmp"
    with documents_path.open("wb") as documents_file:
        batch: list[str] = []
        batch_chars = 0

        def flush() -> None:
            nonlocal documents, fim_documents, split_tokens, batch_chars
            encoded = encoder.encode(batch, first_index=documents)
            for doc in encoded:
                ids = doc.ids.astype(dtype)
                ids.tofile(documents_file)
                content.update(ids)
                fim_documents += doc.fim
                split_tokens += doc.split_tokens
            lengths.append(np.array([doc.ids.size for doc in encoded], dtype=np.int64))
            hashes.append(document_hashes(batch))
            documents += len(batch)
            progress(len(batch))
            batch.clear()
            batch_chars = 0

        for text in texts:
            batch.append(text)
            batch_chars += len(text)
            if len(batch) == BATCH_DOCUMENTS or batch_chars >= BATCH_CHARS:
                flush()
        if batch:
            flush()
    if not documents:
        source = args.dataset or " ".join(args.input)
        shard = f" (shard {args.shard_index or 0} of {args.num_shards})" if args.num_shards > 1 else ""
        raise PrepareError(f"{source}{shard}: no non-empty text found in field {args.text_field!r}")
    tokenize_seconds = time.perf_counter() - start_time

    length_array = np.concatenate(lengths)
    pack_start = time.perf_counter()
    packing = PACKERS[args.packing](length_array, args.seq_len)
    pack_seconds = time.perf_counter() - pack_start
    token_file = np.memmap(documents_path, dtype=dtype, mode="r")
    doc_start = np.cumsum(length_array) - length_array
    shards = _write_sequences(tmp, packing, token_file, doc_start, args.seq_len, dtype, bundle.pad_id)
    del token_file
    documents_path.unlink()
    pieces = np.stack([packing.sequence, packing.start, packing.length, packing.document, packing.doc_offset], 1)
    pieces = np.ascontiguousarray(pieces, dtype=np.int64)
    np.save(tmp / PIECES, pieces)
    content.update(pieces)
    np.save(tmp / DOCUMENT_HASHES, np.concatenate(hashes))

    tokens = int(length_array.sum())
    manifest = {
        "format_version": FORMAT_VERSION,
        "documents": documents,
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
        "shard": {"index": args.shard_index or 0, "count": args.num_shards},
        "inputs": [args.dataset] if args.dataset else _inputs(args),
        "text_bytes": stats.bytes,
        "empty_documents": stats.empty_documents,
        "skipped_bad_rows": stats.skipped,
        "skipped_examples": stats.skipped_examples,
        "shards": shards,
        "content_sha256": content.hexdigest(),
        "preparation": _preparation(args, bundle.fingerprint),
        "seconds": {"tokenize": round(tokenize_seconds, 3), "pack": round(pack_seconds, 3),
                    "total": round(time.perf_counter() - start_time, 3)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _inputs(args: argparse.Namespace) -> list[str]:
    """The files (byte ranges, in a shard of a JSON Lines file) this directory was built from."""
    return [part.describe() for part in partition(resolve_inputs(args.input), args.num_shards, args.shard_index or 0)]


def _preparation(args: argparse.Namespace, tokenizer_fingerprint: str) -> str:
    """What every shard of one prepare command shares, hashed: the inputs (absolute paths and sizes,
    or the hub dataset) and every setting that shapes the output."""
    inputs = [args.dataset, args.dataset_config, args.split] if args.dataset else \
        [[str(path.resolve()), path.stat().st_size] for path in resolve_inputs(args.input)]
    settings = {key: getattr(args, key) for key in ("text_field", "seq_len", "fim_rate", "split_rate", "packing", "seed",
                                                    "num_shards", "skip_bad")}
    text = json.dumps({"inputs": inputs, "tokenizer": tokenizer_fingerprint, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _summary(manifest: dict) -> str:
    fill = manifest["tokens"] / max(1, manifest["sequences"] * manifest["seq_len"])
    return (f"documents {manifest['documents']}  tokens {manifest['tokens']}  sequences {manifest['sequences']} "
            f"x {manifest['seq_len']}  fill {fill:.2%}\n"
            f"truncated documents {manifest['truncated_documents']}  FIM documents {manifest['fim_documents']}  "
            f"split tokens {manifest['split_tokens']}  skipped rows {manifest['skipped_bad_rows']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        indices = _check(args)
        if len(indices) > 1:
            from .jobs import run_shards

            manifests = run_shards(prepare, args, indices)
        else:
            if args.workers is not None:
                os.environ["RAYON_NUM_THREADS"] = str(args.workers)
            manifests = [prepare(args)]
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(manifests) > 1:
        total = {key: sum(m[key] for m in manifests) for key in ("documents", "tokens", "sequences",
                                                                  "truncated_documents", "fim_documents",
                                                                  "split_tokens", "skipped_bad_rows")}
        print(_summary({**total, "seq_len": args.seq_len}))
        print(f"wrote {len(manifests)} shard directories {args.output}/shard-*-of-{args.num_shards:05d}/")
        return 0
    output = shard_output(args, indices[0])
    print(_summary(manifests[0]))
    print(f"wrote {output}/ ({len(manifests[0]['shards'])} token shard(s), pieces.npy, manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
