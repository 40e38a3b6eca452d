"""A frozen rank ends the job (``train.hang_timeout_s``): a daemon thread on every rank watches the
phase record (``plugins.progress``) that the loop, the expert all-to-all and the pipeline runtime
update at each phase boundary. When no boundary is crossed within the timeout it writes every
thread's Python stack to ``RUN_DIR/hang-rankN.txt`` (``faulthandler``), prints one line naming the
rank, the step and the phase, and ends the process with ``EXIT_HANG``. DeepSpeed's launcher then
ends the node's other ranks (SIGTERM, SIGKILL after 30 s); ranks of other nodes, stuck in a
collective with the dead one, reach their own timeout. A rank stopped altogether (SIGSTOP, a
frozen host) cannot report itself: its peers, waiting on it, do.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from plugins.progress import RECORD
from plugins.run_lock import hard_exit

EXIT_HANG = 4


def process_group_timeout(hang_timeout_s: float) -> timedelta | None:
    """The process groups' timeout: twice the watchdog's, so a collective the watchdog could not end
    (its thread starved) still ends; None (torch's default) without a watchdog."""
    return timedelta(seconds=2 * hang_timeout_s) if hang_timeout_s > 0 else None


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, timeout_s: float):
        self.path, self.rank, self.timeout = Path(run_dir) / f"hang-rank{rank}.txt", rank, timeout_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def start(self) -> Watchdog:
        RECORD.last = time.monotonic()
        if self.timeout > 0:
            self.thread.start()
        return self

    def _watch(self) -> None:
        period = min(5.0, self.timeout / 10)
        while not self.stop.wait(period):
            quiet = time.monotonic() - RECORD.last
            if quiet > self.timeout:
                self._report(quiet)

    def _report(self, quiet: float) -> None:
        name, step = RECORD.name, RECORD.step
        with open(self.path, "w") as out:
            out.write(f"rank {self.rank}: no progress for {quiet:.0f} s in {name} at step {step}\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)
        print(f"error: rank {self.rank}: no progress for {quiet:.0f} s (train.hang_timeout_s = {self.timeout:g}) "
              f"in {name} at step {step}; every thread's stack: {self.path}; ending the job", file=sys.stderr,
              flush=True)
        hard_exit(EXIT_HANG)

    def close(self) -> None:
        self.stop.set()
