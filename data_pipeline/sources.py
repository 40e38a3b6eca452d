"""Text sources: local ``.jsonl/.json/.parquet/.txt`` files and globs, or a HF hub dataset, all
read through HF ``datasets`` in streaming mode so memory does not grow with the corpus.

Every problem is a ``SourceError`` whose one-line message names the file (and line where
there is one). A ``.txt`` file is one document; JSON/parquet rows are documents.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from plugins.errors import ProjectError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


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
            if path.suffix not in BUILDERS:
                raise SourceError(f"{path}: unsupported extension {path.suffix!r} (expected {', '.join(BUILDERS)})")
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = raw[: bad.start].count(b"\n") + 1
        return f"{path}: line {line}: not valid UTF-8 (byte offset {bad.start})"
    if BUILDERS[path.suffix] == "json":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as bad:
                return f"{path}: line {number}: invalid JSON ({bad.msg})"
    return f"{path}: unreadable ({str(error).splitlines()[0][:200]})"


def _rows_skipping_bad(path: Path, text_field: str, stats: SourceStats) -> Iterator[object]:
    """Line-level JSONL reading used only for ``skip_bad``: bad lines are counted, not fatal."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                yield row.get(text_field) if isinstance(row, dict) else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                stats.skipped += 1
                if len(stats.skipped_examples) < 5:
                    stats.skipped_examples.append(f"{path}:{number}")


def _file_texts(path: Path, text_field: str, skip_bad: bool, stats: SourceStats) -> Iterator[object]:
    builder = BUILDERS[path.suffix]
    if builder == "json" and skip_bad:
        yield from _rows_skipping_bad(path, text_field, stats)
        return
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    dataset = _load(builder, data_files=str(path), split="train", **kwargs)
    field_name = "text" if builder == "text" else text_field
    try:
        for row in dataset:
            if field_name not in row:
                raise SourceError(f"{path}: field {text_field!r} not found (fields: {', '.join(row) or 'none'})")
            yield row[field_name]
    except SourceError:
        raise
    except Exception as error:  # pyarrow/datasets/codec failures: name the file and line instead
        if skip_bad:
            stats.skipped += 1
            stats.skipped_examples.append(str(path))
            return
        raise SourceError(_diagnose(path, error)) from None


def iter_texts(
    inputs: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    skip_bad: bool = False,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Yield the non-empty documents of local ``inputs`` (paths or globs) or of hub ``dataset``.

    A row whose text field is missing, null or not a string is an error naming the file and row
    (or, with ``skip_bad``, counted in ``stats.skipped``); empty documents are counted and passed over.
    """
    stats = stats if stats is not None else SourceStats()
    if bool(inputs) == bool(dataset):
        raise SourceError("give either input files or a dataset name, not both or neither")
    if dataset:
        streams = [(dataset, (row.get(text_field) for row in _load(dataset, name=dataset_config, split=split)))]
    else:
        streams = [(str(path), _file_texts(path, text_field, skip_bad, stats)) for path in resolve_inputs(inputs)]
    for name, texts in streams:
        for row_number, text in enumerate(texts, start=1):
            if not isinstance(text, str):
                if skip_bad:
                    stats.skipped += 1
                    continue
                what = "missing or null" if text is None else f"a {type(text).__name__}, not a string"
                raise SourceError(f"{name}: row {row_number}: field {text_field!r} is {what}")
            if not text:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text
