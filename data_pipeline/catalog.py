"""Finding and checking prepared directories (issue 18): a source is a prepared directory, a
directory of ``prepare --num-shards`` shard directories (all of them present, all of one prepare
command: one shard count, one ``preparation`` in their manifests), or a glob of either. Every
directory of a run must share one tokenizer and one window length; a mismatch is one line naming
both directories."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

from .dataset import DatasetError, PackedDataset
from .layout import MANIFEST, shard_dir_name

SHARD_DIR = re.compile(r"shard-(\d{5})-of-(\d{5})")


def prepared_dirs(path: str) -> list[Path]:
    """The prepared directories ``path`` names, in order."""
    if glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise DatasetError(f"{path}: no directory matches this pattern")
        found = [d for match in matches for d in prepared_dirs(match)]
        return list(dict.fromkeys(found))
    directory = Path(path)
    if (directory / MANIFEST).is_file():
        return [directory]
    shards = sorted(d for d in directory.iterdir() if SHARD_DIR.fullmatch(d.name)) if directory.is_dir() else []
    if not shards:
        raise DatasetError(f"{directory}: no {MANIFEST} and no shard-*-of-* directories (build it with "
                           "`python -m data_pipeline.prepare`)")
    counts = sorted({int(SHARD_DIR.fullmatch(shard.name).group(2)) for shard in shards})
    if len(counts) > 1:
        names = " and ".join(f"shard-*-of-{count:05d}" for count in counts)
        raise DatasetError(f"{directory}: holds the shards of {len(counts)} prepare runs ({names}); a directory "
                           "holds one run's shards: move the others out")
    count = counts[0]
    for index in range(count):
        shard = directory / shard_dir_name(index, count)
        if not (shard / MANIFEST).is_file():
            raise DatasetError(f"{shard}: shard {index} of {count} is missing or incomplete (prepare it with "
                               f"--num-shards {count} --shard-index {index})")
    found = [directory / shard_dir_name(index, count) for index in range(count)]
    _check_one_preparation(found)
    return found


def _check_one_preparation(shards: list[Path]) -> None:
    """Every shard written by the same prepare command (inputs, seed and settings: ``preparation``)."""
    first = read_manifest(shards[0]).get("preparation")
    for shard in shards[1:]:
        if read_manifest(shard).get("preparation") != first:
            raise DatasetError(f"{shards[0].parent}: {shards[0].name} and {shard.name} come from different prepare "
                               "runs (another input, seed or setting); prepare the odd shard again with the others' "
                               "command and its --shard-index")


def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"{directory / MANIFEST}: unreadable ({error})") from None


def check_compatible(directories: list[Path]) -> None:
    """Every directory built with the first one's tokenizer and window length."""
    first = directories[0]
    reference = read_manifest(first)
    for directory in directories[1:]:
        manifest = read_manifest(directory)
        if manifest.get("seq_len") != reference.get("seq_len"):
            raise DatasetError(f"{first} and {directory}: different seq_len ({reference.get('seq_len')} vs "
                               f"{manifest.get('seq_len')}); a run reads one window length")
        ours, theirs = (str((m.get("tokenizer") or {}).get("fingerprint")) for m in (reference, manifest))
        if ours != theirs:
            raise DatasetError(f"{first} and {directory}: built with different tokenizers ({ours[:12]}… vs "
                               f"{theirs[:12]}…); a run reads one tokenizer's data")


def open_prepared(directories: list[Path], tokenizer_fingerprint: str | None) -> list[PackedDataset]:
    """Every directory opened and checked (manifest, token files, piece index) before any work."""
    check_compatible(directories)
    return [PackedDataset(directory, tokenizer_fingerprint) for directory in directories]
