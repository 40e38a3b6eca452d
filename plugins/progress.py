"""Where this process is, for a watchdog and the straggler statistics: one module-level record of
the current phase (forward, backward, an expert all-to-all, a pipeline send or receive, the
optimizer step, a save ...), the step, and when the process last crossed a phase boundary.

Code that moves tensors between ranks marks its blocking calls with ``with waiting("name"):`` and
the training loop marks its phases with ``with phase("name"):``; either costs a few attribute
writes. ``waiting`` also adds the time spent blocked to ``RECORD.waited`` (on the thread that set
``RECORD.owner``), so a step's busy time is its wall time minus what it waited for other ranks.
Nothing here imports the training code: the loop reads the record, plugins only write it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Record:
    name: str = "start-up"
    step: int = 0
    last: float = field(default_factory=time.monotonic)  # the last phase boundary crossed
    waited: float = 0.0  # seconds blocked in ``waiting`` on the owner thread since the loop reset it
    owner: int | None = None  # the thread whose waits count (the training loop's)


RECORD = Record()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """The process works on ``name`` until the block ends; then back to the enclosing phase."""
    outer = RECORD.name
    RECORD.name, RECORD.last = name, time.monotonic()
    try:
        yield
    finally:
        RECORD.name, RECORD.last = outer, time.monotonic()


@contextmanager
def waiting(name: str) -> Iterator[None]:
    """A call that blocks on other ranks (a collective, a receive): a phase whose duration counts as
    waiting, not work."""
    outer, start = RECORD.name, time.monotonic()
    RECORD.name, RECORD.last = name, start
    try:
        yield
    finally:
        end = time.monotonic()
        if RECORD.owner == threading.get_ident():
            RECORD.waited += end - start
        RECORD.name, RECORD.last = outer, end
