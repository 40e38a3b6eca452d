"""Preemption: SIGTERM (a scheduler's stop, DeepSpeed's launcher passing one on), SIGUSR1 (SLURM's
``--signal=USR1@SECONDS`` warning ahead of a time limit) and SIGINT (Ctrl-C) on any rank are noted
here and acted on at the next step boundary, or the next micro-batch of a validation, when every
rank has learnt of it through a small all-reduce (the end-of-step one, ``launch.training.stragglers``,
or the validation's): the step's checkpoint is saved within ``train.preempt_grace_s`` and the job
exits 0, to be requeued with ``--resume auto``. Further signals while that happens are noted and
ignored: the save is bounded by its grace, the launcher's SIGKILL by its own.

The end of the launcher that started the rank counts the same (``LAUNCHER_GONE``): the ``deepspeed``
command (its runner) dies of a SIGTERM or SIGINT without passing it on, leaving its per-node
launcher and the ranks running, and a per-node launcher killed outright leaves its ranks. A rank
checks at each boundary that the chain of DeepSpeed launcher processes above it is intact (each
still the parent of the one below), so a job whose launcher is gone saves and releases its run dir.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAUNCHER_GONE = 256  # not a signal number: the rank's launcher exited


class Preemption:
    """``signal``: the first of ``SIGNALS`` this process received, or ``LAUNCHER_GONE`` (0: none)."""

    def __init__(self, rank: int):
        self.rank, self.signal, self.previous = rank, 0, {}
        self.launchers = launcher_chain()

    def install(self) -> Preemption:
        for number in SIGNALS:
            self.previous[number] = signal.signal(number, self._received)
        return self

    def _received(self, number: int, frame) -> None:
        if not self.signal:
            self.signal = number
            print(f"rank {self.rank}: {name(number)} received; saving at the end of this step",
                  file=sys.stderr, flush=True)

    def pending(self) -> int:
        """What this rank has to act on (0: nothing): a signal received, else ``LAUNCHER_GONE`` once
        a launcher above it has exited. Checked at step and validation micro-batch boundaries."""
        gone = gone_launcher(self.launchers) if not self.signal else None
        if gone is not None:
            self.signal = LAUNCHER_GONE
            print(f"rank {self.rank}: its launcher (pid {gone}) is gone; saving at the end of this step",
                  file=sys.stderr, flush=True)
        return self.signal

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}


def _is_launcher(process: psutil.Process) -> bool:
    """``deepspeed`` (the runner) or ``python -m deepspeed.launcher.*``."""
    try:
        head = process.cmdline()[:4]
    except psutil.Error:
        return False
    return any(part.startswith("deepspeed.launcher") or Path(part).name == "deepspeed" for part in head)


def launcher_chain() -> list[int]:
    """The PIDs of the DeepSpeed launcher processes above this one, nearest first; empty for a rank
    started without one (``python launch/pretrain.py``). The outermost one's own parent (a shell, a
    batch script) is not watched: its end (a closed terminal under ``nohup``) ends nothing."""
    chain, process = [], psutil.Process().parent()
    while process is not None and _is_launcher(process):
        chain.append(process.pid)
        process = process.parent()
    return chain


def gone_launcher(chain: list[int]) -> int | None:
    """The launcher of ``chain`` that exited (one is no longer the parent of the process below it),
    or None."""
    for child, parent in zip([os.getpid(), *chain], chain):
        try:
            if psutil.Process(child).ppid() != parent:
                return parent
        except psutil.NoSuchProcess:
            return child
    return None


def name(number: int) -> str:
    return "its launcher's exit" if number == LAUNCHER_GONE else signal.Signals(number).name
