"""One error family for the whole project: every expected failure (a bad config value, a missing
file, a layout that cannot run) is a ``ProjectError`` whose message is one line naming the
file, key or flag and what was expected. Every CLI catches ``ProjectError`` and nothing broader,
so a real bug still shows its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ProjectError(ValueError):
    """An input the project cannot use; ``str(error)`` is the one line shown to the user."""


class ConfigError(ProjectError):
    """A configuration value or flag that cannot run; the message names the file and the key."""


def run_cli(body: Callable[[], int], code: int = 2) -> int:
    """Run a CLI's body; a ``ProjectError`` becomes ``error: <line>`` on stderr and exit ``code``."""
    try:
        return body()
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return code
