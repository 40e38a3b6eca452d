"""Shared by the benchmarks: the real corpus every machine has, the interleaved timer, the peak
memory of a process tree and the JSON result writer."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from data_pipeline.builtin_corpus import write_python_corpus as build_corpus
from plugins.atomic import write_text_atomic

__all__ = ["build_corpus", "run_with_peak", "time_interleaved", "write_result"]


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON atomically (its directory created if missing)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Time each step function once per round, in turn, so machine drift hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def _high_water_kb(pid: int) -> int:
    """VmHWM of a live process: the kernel's peak resident set, at least the current one."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_with_peak(command: list[str], interval: float = 0.05, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` (``subprocess.run``'s keyword arguments, output captured as text) and return it
    with the largest peak resident MB of any process of its tree, read from each live process every
    ``interval`` seconds (its ``VmHWM`` and current RSS). ``getrusage(RUSAGE_CHILDREN)`` of the
    parent is no substitute: behind the deepspeed launcher it read 2.9 GB for a trainer that peaked
    at 4.1 GB by its own ``ru_maxrss``."""
    timeout = kwargs.pop("timeout", None)
    peaks: dict[int, float] = {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        root = subprocess.Popen(command, stdout=out, stderr=err, text=True, **kwargs)
        parent, start = psutil.Process(root.pid), time.monotonic()
        while root.poll() is None:
            if timeout is not None and time.monotonic() - start > timeout:
                root.kill()
                raise subprocess.TimeoutExpired(command, timeout)
            try:
                tree = [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in tree:
                try:
                    kb = max(_high_water_kb(proc.pid), proc.memory_info().rss // 1024)
                except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                    continue
                peaks[proc.pid] = max(peaks.get(proc.pid, 0), kb / 1024)
            time.sleep(interval)
        root.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, root.returncode, out.read(), err.read())
    return result, max(peaks.values(), default=0.0)
