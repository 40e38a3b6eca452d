"""Writes that are never seen half done: a file is written under a temporary sibling name and
renamed into place; a directory is built under a temporary sibling and renamed when complete.
``os.replace`` is atomic on POSIX file systems, so a reader (or a resumed run) sees the old
version or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ProjectError


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file, then rename it to ``path``; ``tmp`` is removed on failure."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure_atomic(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG at ``path``; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def torch_save_atomic(obj, path: str | Path) -> Path:
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def staged_directory(output: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``output``; publish it as ``output`` on success,
    delete it on any failure (interrupts included). A replaced directory is removed only after
    the new one is in place."""
    output = Path(output)
    tmp = _temporary(output)
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


class OutputDirError(ProjectError):
    """An output path that cannot be written; one line naming the option."""


def check_output_dir(output: Path, overwrite: bool, option: str = "--output") -> None:
    """Refuse a non-directory or a non-empty directory (unless ``overwrite``) before any work."""
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"{option} {output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputDirError(f"{option} {output}: exists and is not empty (pass --overwrite to replace it)")
