"""Text sources: local ``.jsonl/.json/.parquet/.txt`` files and globs, or a HF hub dataset, read
as streams so memory does not grow with the corpus: JSON Lines line by line (any byte range of a
file, for the shards of ``partition``), a ``.txt`` file whole, parquet by record batch through
pyarrow, ``.json`` and hub datasets through HF ``datasets`` in streaming mode (a hub dataset is
sharded by its files).

Every problem is a ``SourceError`` whose one-line message names the file (and line where
there is one). A ``.txt`` file is one document; JSON/parquet rows are documents; an empty file
holds no documents.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from plugins.errors import ProjectError

from .partition import Part, partition

EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")


class SourceError(ProjectError):
    """Unreadable or malformed input; the message names the file/field and what was expected."""


@dataclass
class SourceStats:
    """What reading saw: documents yielded, empty ones passed over, bad rows skipped (``skip_bad``)."""

    documents: int = 0
    empty_documents: int = 0
    skipped: int = 0
    bytes: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs (sorted, de-duplicated) and check every file has a supported extension."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise SourceError(f"{pattern}: no file matches this pattern")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise SourceError(f"{path}: no such file")
            if path.suffix not in EXTENSIONS:
                raise SourceError(f"{path}: unsupported extension {path.suffix!r} (expected {', '.join(EXTENSIONS)})")
            if path not in files:
                files.append(path)
    return files


def _load(builder: str, **kwargs):
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets.load_dataset(builder, streaming=True, **kwargs)


def _diagnose(path: Path, error: Exception) -> str:
    """Turn a reader failure into 'file: line N: what' by scanning the file ourselves."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = raw[: bad.start].count(b"\n") + 1
        return f"{path}: line {line}: not valid UTF-8 (byte offset {bad.start})"
    return f"{path}: unreadable ({str(error).splitlines()[0][:200]})"


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line starting at byte ``offset`` (counted only for a message)."""
    count = 0
    with path.open("rb") as handle:
        while offset > 0:
            block = handle.read(min(offset, 1 << 24))
            count += block.count(b"\n")
            offset -= len(block)
    return count + 1


def _jsonl_rows(part: Part, text_field: str, skip_bad: bool, stats: SourceStats) -> Iterator[tuple[str, object]]:
    """``(where, text)`` for the rows of a JSON Lines file starting in ``[part.start, part.end)``."""
    path, end = part.path, part.end
    with path.open("rb") as handle:
        position = part.start
        if position > 0:  # a row that began before the part belongs to the previous one
            handle.seek(position - 1)
            if handle.read(1) != b"\n":
                position += len(handle.readline())
        while end is None or position < end:
            raw = handle.readline()
            if not raw:
                return
            line_start, position = position, position + len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise TypeError(f"expected a JSON object with field {text_field!r}, got a {type(row).__name__}")
                if text_field not in row:
                    raise KeyError(f"field {text_field!r} not found (fields: {', '.join(row) or 'none'})")
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as bad:
                line = _line_number(path, line_start)
                if skip_bad:
                    stats.skipped += 1
                    if len(stats.skipped_examples) < 5:
                        stats.skipped_examples.append(f"{path}:{line}")
                    continue
                what = {UnicodeDecodeError: "not valid UTF-8", json.JSONDecodeError: f"invalid JSON ({bad})"}
                raise SourceError(f"{path}: line {line}: {what.get(type(bad), bad.args[0])}") from None
            text = row[text_field]
            yield ("" if isinstance(text, str) else f"line {_line_number(path, line_start)}"), text


def _parquet_rows(path: Path, text_field: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        if text_field not in reader.schema_arrow.names:
            raise SourceError(f"{path}: field {text_field!r} not found (fields: {', '.join(reader.schema_arrow.names)})")
        row = 0
        for batch in reader.iter_batches(columns=[text_field], batch_size=256):
            for text in batch.column(0).to_pylist():
                row += 1
                yield f"row {row}", text
    except SourceError:
        raise
    except Exception as error:  # pyarrow's failures: name the file instead
        raise SourceError(f"{path}: unreadable parquet ({str(error).splitlines()[0][:200]})") from None


def _datasets_rows(path: Path, text_field: str, skip_bad: bool, stats: SourceStats) -> Iterator[tuple[str, object]]:
    """``.json`` (an array of rows, or rows one per line) through HF ``datasets``."""
    try:
        dataset = _load("json", data_files=str(path), split="train")
        for row_number, row in enumerate(dataset, start=1):
            if text_field not in row:
                raise SourceError(f"{path}: field {text_field!r} not found (fields: {', '.join(row) or 'none'})")
            yield f"row {row_number}", row[text_field]
    except SourceError:
        raise
    except Exception as error:  # pyarrow/datasets/codec failures: name the file and line instead
        if not path.read_bytes().strip():  # only whitespace: no documents
            return
        if skip_bad:
            stats.skipped += 1
            stats.skipped_examples.append(str(path))
            return
        raise SourceError(_diagnose(path, error)) from None


def _text_file(path: Path) -> Iterator[tuple[str, object]]:
    """A ``.txt`` file: one document, read directly (its text once in memory, nothing more)."""
    try:
        yield "", path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(_diagnose(path, error)) from None


def _file_rows(part: Part, text_field: str, skip_bad: bool, stats: SourceStats) -> Iterator[tuple[str, object]]:
    if part.path.stat().st_size == 0:
        return iter(())
    if part.path.suffix == ".txt":
        return _text_file(part.path)
    if part.path.suffix == ".jsonl":
        return _jsonl_rows(part, text_field, skip_bad, stats)
    if part.path.suffix == ".parquet":
        return _parquet_rows(part.path, text_field)
    return _datasets_rows(part.path, text_field, skip_bad, stats)


def _hub_rows(dataset: str, config: str | None, split: str, text_field: str, num_shards: int,
              shard_index: int) -> Iterator[tuple[str, object]]:
    stream = _load(dataset, name=config, split=split)
    if num_shards > 1:
        if stream.num_shards < num_shards:
            raise SourceError(f"--dataset {dataset}: its {stream.num_shards} file(s) cannot make {num_shards} shards "
                              f"(use --num-shards {stream.num_shards} or fewer)")
        stream = stream.shard(num_shards, shard_index)
    for row_number, row in enumerate(stream, start=1):
        yield f"row {row_number}", row.get(text_field)


def iter_texts(
    inputs: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    skip_bad: bool = False,
    stats: SourceStats | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> Iterator[str]:
    """Yield the non-empty documents of local ``inputs`` (paths or globs) or of hub ``dataset``;
    with ``num_shards`` > 1 only those of shard ``shard_index`` (``partition``).

    A row whose text field is missing, null or not a string is an error naming the file and row
    (or, with ``skip_bad``, counted in ``stats.skipped``); empty documents are counted and passed over.
    """
    stats = stats if stats is not None else SourceStats()
    if bool(inputs) == bool(dataset):
        raise SourceError("give either input files or a dataset name, not both or neither")
    if dataset:
        streams = [(dataset, _hub_rows(dataset, dataset_config, split, text_field, num_shards, shard_index))]
    else:
        parts = partition(resolve_inputs(inputs), num_shards, shard_index)
        streams = [(str(part.path), _file_rows(part, text_field, skip_bad, stats)) for part in parts]
    for name, rows in streams:
        for where, text in rows:
            if not isinstance(text, str):
                if skip_bad:
                    stats.skipped += 1
                    continue
                what = "missing or null" if text is None else f"a {type(text).__name__}, not a string"
                raise SourceError(f"{name}: {where}: field {text_field!r} is {what}")
            if not text:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text
