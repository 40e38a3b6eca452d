"""The hang watchdog (``launch.training.watchdog``) in a process of its own: a phase that makes no
progress within the timeout ends the process with every thread's stack in ``hang-rankN.txt`` and
one line naming the rank, step and phase; phases that keep moving do not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from .conftest import ROOT

SCRIPT = """
import sys, threading, time
from plugins.progress import RECORD, phase
from launch.training.watchdog import Watchdog

Watchdog(sys.argv[1], 3, 1.0).start()
RECORD.step = 7
for _ in range(30):  # 3 s of short phases: progress
    with phase("forward"):
        time.sleep(0.1)
print("moving phases passed", flush=True)
threading.Thread(target=lambda: time.sleep(60), name="bystander", daemon=True).start()
with phase("expert all-to-all"):
    time.sleep(60)  # stuck
"""


def test_a_phase_without_progress_ends_the_process_with_the_stacks(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 4 and "moving phases passed" in result.stdout
    assert time.monotonic() - started < 20
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank 3: no progress for ") and "in expert all-to-all at step 7" in line
    stacks = (tmp_path / "hang-rank3.txt").read_text()
    assert "in expert all-to-all at step 7" in stacks.splitlines()[0]
    assert stacks.count("Thread 0x") + stacks.count("Current thread") >= 3  # main, bystander, watchdog
    stuck = SCRIPT.splitlines().index("    time.sleep(60)  # stuck") + 1
    assert f'<string>", line {stuck} in <module>' in stacks  # the main thread, where it is stuck
