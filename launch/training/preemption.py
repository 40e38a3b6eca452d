"""Preemption: SIGTERM (a scheduler's stop, DeepSpeed's launcher passing one on), SIGUSR1 (SLURM's
``--signal=USR1@SECONDS`` warning ahead of a time limit) and SIGINT (Ctrl-C) on any rank are noted
here and acted on at the next step boundary, when every rank has learnt of it through the step's
end-of-step all-reduce (``launch.training.stragglers``): the step's checkpoint is saved within
``train.preempt_grace_s`` and the job exits 0, to be requeued with ``--resume auto``. Further signals
while that happens are noted and ignored: the save is bounded by its grace, the launcher's SIGKILL
by its own.
"""

from __future__ import annotations

import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """``signal``: the first of ``SIGNALS`` this process received (0: none)."""

    def __init__(self, rank: int):
        self.rank, self.signal, self.previous = rank, 0, {}

    def install(self) -> Preemption:
        for number in SIGNALS:
            self.previous[number] = signal.signal(number, self._received)
        return self

    def _received(self, number: int, frame) -> None:
        if not self.signal:
            self.signal = number
            print(f"rank {self.rank}: {name(number)} received; saving at the end of this step",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}


def name(number: int) -> str:
    return signal.Signals(number).name
