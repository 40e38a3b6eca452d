"""Starting several gloo ranks from a test: ``spawn`` (processes of this test, rendezvous through a
file, so no port is involved) and ``free_port`` (for the ``deepspeed`` launcher, which needs one).

``free_port`` hands out ports below the kernel's ephemeral range, which the kernel never gives to a
``bind(0)`` or an outgoing connection, from a counter shared by every test process under a file
lock; a port some other program already listens on is skipped. So two tests never receive the
same port, and nothing can take a port between it being handed out and the launcher binding it."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

_COUNTER = Path(tempfile.gettempdir()) / "deepseek-pretrain-test-ports"

# One step of a layer or model split over ranks against the same step in one process: only the order
# of float sums differs (no Adam step to amplify it, and every rank routes its tokens as the one
# process does). Measured largest relative differences: expert-parallel outputs 4.0e-7 and gradients
# 7.8e-7 (tests/test_expert_parallel.py), pipeline losses 1.1e-7 and gradients 2.4e-7
# (tests/test_pipeline_runtime.py). The bound is 10x the largest, rounded up to a power of ten.
STEP_RTOL = 1e-5


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    low, high = 20000, _ephemeral_start()
    with open(_COUNTER, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read().strip()
        port = int(text) if text.isdigit() and low <= int(text) < high else low + os.getpid() % 1000
        for _ in range(high - low):
            port = port + 1 if port + 1 < high else low
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            break
        handle.seek(0)
        handle.truncate()
        handle.write(str(port))
    return port


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (joined; an exception fails the test)."""
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_entry, args=(world, str(Path(directory) / "store"), fn, args), nprocs=world, join=True)
