"""Output directories that appear only when complete: built under a temporary sibling name and
renamed into place; a replaced directory is removed only after the new one is in place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputDirError(ValueError):
    """An output path that cannot be written; one line naming the option."""


def check_output_dir(output: Path, overwrite: bool, option: str = "--output") -> None:
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"{option} {output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputDirError(f"{option} {output}: exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``output``; publish it as ``output`` on success,
    delete it on any failure (interrupts included)."""
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old)
    else:
        tmp.rename(output)
