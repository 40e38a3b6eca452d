"""Leftovers of killed ``prepare`` runs (issue 20): a run builds its output under the hidden name
``.NAME.tmp-PID`` (``plugins.atomic.staged_directory``) and a replaced one moves aside as
``.NAME.old-PID``; a run killed before renaming leaves them behind. The next run for the same
output removes those whose process is gone (a live PID may be a run still writing: left alone)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from plugins.run_lock import process_alive


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete ``output``'s ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings whose PID is dead; returns them."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(tmp|old)-(\d+)")
    removed = []
    if not output.parent.is_dir():
        return removed
    for path in output.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(2)) != os.getpid() and not process_alive(int(match.group(2))):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed
