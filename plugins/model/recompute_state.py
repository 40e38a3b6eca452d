"""Whether this thread is re-running a checkpointed block's forward inside backward
(``train.recompute: full``, ``plugins.model.recompute``; report 3.2.3). Side effects of a forward
that must happen once per micro-batch (the MoE layer's expert-load counts and balance loss) check it."""

from __future__ import annotations

import threading

_thread = threading.local()


def recomputing() -> bool:
    """True while a checkpointed forward runs again on this thread (autograd may run backward on
    another thread than the forward: the flag is per thread)."""
    return getattr(_thread, "recomputing", False)


class Recomputation:
    """Sets the flag while entered; re-enterable (``torch.utils.checkpoint`` enters the same context
    once per recomputation, and a split backward recomputes twice)."""

    def __enter__(self) -> None:
        self.previous = getattr(self, "previous", [])
        self.previous.append(recomputing())
        _thread.recomputing = True

    def __exit__(self, *exc) -> None:
        _thread.recomputing = self.previous.pop()
