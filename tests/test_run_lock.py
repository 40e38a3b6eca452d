"""One writer per directory (``plugins.run_lock``): a lock held by a live process refuses a second one
naming its host and PID; the lock a dead process of this host left is taken over with a line; a
record of another host counts while its heartbeat is fresh; two prepare jobs into one --output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from plugins.run_lock import STALE_S, DirectoryLock, LockedError

from .conftest import ROOT

HOLD = ("import sys, time; from plugins.run_lock import DirectoryLock; "
        "DirectoryLock(sys.argv[1], 'the directory').acquire(); print('held', flush=True); time.sleep(60)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock at tmp_path/dir/run.lock."""
    path = tmp_path / "dir" / "run.lock"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "held"
    yield path, process
    process.kill()
    process.wait()


def test_a_live_holder_is_named_and_a_dead_one_taken_over(holder):
    path, process = holder
    with pytest.raises(LockedError, match=rf"in use by pid {process.pid} on host {socket.gethostname()}"):
        DirectoryLock(path, "the directory").acquire()
    process.kill()
    process.wait()  # killed: its record stays, the kernel dropped its flock
    assert json.loads(path.read_text())["pid"] == process.pid
    lock = DirectoryLock(path, "the directory")
    note = lock.acquire()
    assert f"took over the lock of pid {process.pid}" in note and "that process is gone" in note
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    again = DirectoryLock(path, "the directory")  # a released lock is simply free
    assert again.acquire() is None
    again.release()


def test_another_hosts_record_counts_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "2026-01-01 00:00:00"}))
    with pytest.raises(LockedError, match="in use by pid 4242 on host node-17"):
        DirectoryLock(path, "the directory").acquire()
    old = time.time() - STALE_S - 1
    os.utime(path, (old, old))
    lock = DirectoryLock(path, "the directory")
    assert "no sign of life" in lock.acquire()
    lock.release()


def test_two_prepare_jobs_into_one_output(holder, tmp_path, capfd, tokenizer_dir):
    """A second prepare into an --output another job is writing is refused before any work; the
    other job's files are left alone."""
    from data_pipeline.prepare import main as prepare

    from .corpus import code_documents, write_jsonl

    path, process = holder
    output = path.parent / "packed"  # the lock another prepare of this output holds
    path.rename(path.parent / ".packed.lock")
    staging = path.parent / f".packed.tmp-{process.pid}"  # its directory under construction
    staging.mkdir()
    corpus = write_jsonl(tmp_path / "docs.jsonl", code_documents(limit=2))
    assert prepare(["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--seq-len", "64",
                    "--output", str(output)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--output {output}: in use by pid {process.pid}" in err[0]
    assert staging.is_dir() and not output.exists()
