"""Whether this thread is re-running a checkpointed block's forward inside backward
(``train.recompute: full``, ``plugins.model.recompute``; report 3.2.3). Side effects of a forward
that must happen once per micro-batch (the MoE layer's expert-load counts and balance loss) check it."""

from __future__ import annotations

import contextlib
import threading

_thread = threading.local()


def recomputing() -> bool:
    """True while a checkpointed forward runs again on this thread (autograd may run backward on
    another thread than the forward: the flag is per thread)."""
    return getattr(_thread, "recomputing", False)


@contextlib.contextmanager
def recomputation():
    previous, _thread.recomputing = recomputing(), True
    try:
        yield
    finally:
        _thread.recomputing = previous
