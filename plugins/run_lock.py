"""One writer per directory: a run dir (``launch/pretrain.py``) or a prepare ``--output`` shard.

The lock is ``fcntl.flock`` on a lock file holding a JSON record of its holder (host, pid, start
time), whose modification time a daemon thread refreshes every ``HEARTBEAT_S`` seconds. The kernel
drops a flock when its process dies, so a free flock beside a record of this host means the holder
is gone, whatever process now has the record's PID (a requeue in a fresh container reuses PIDs): the
record is taken over with a line naming it. A record of another host is trusted while its heartbeat
is fresh (a file system may not share flocks between hosts), and taken over once it is older than
``STALE_S`` (hosts' clocks are assumed to agree within a minute); on a file system without flock the
record alone decides. On release the file is removed; an acquirer checks that the file it locked is
still the one at the path, so a removal never lets two holders in. The lock file is opened without
following a symbolic link and must be a regular file of one link: a lock never writes through a
link into a file it did not create.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

from .errors import ProjectError

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}  # file systems without flock (some NFS mounts)
HEARTBEAT_S = 10.0
STALE_S = 120.0
_HELD: set[DirectoryLock] = set()


class LockedError(ProjectError):
    """Another live job writes the directory; the message names it."""


def process_alive(pid: int) -> bool:
    """Whether a process of this host has this PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class DirectoryLock:
    """``DirectoryLock(path, what).acquire()`` -> a line to show (a stale lock taken over) or None;
    raises ``LockedError`` naming the holder. ``release()`` removes the lock file."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.handle = None
        self.stop = threading.Event()
        self.beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = self._open()
            self.flocked = True
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, *UNSUPPORTED):
                    handle.close()
                    raise
                if error.errno not in UNSUPPORTED:  # held: else a file system without flock, the record decides
                    record = self._record(handle)
                    handle.close()
                    raise LockedError(f"{self.what}: in use by {self._holder(record)}; "
                                      "one job at a time writes it") from None
                self.flocked = False
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # its holder removed the file while we waited for it: lock the new one
        self.handle = handle
        try:
            note = self._take_over(self._record(handle))
        except LockedError:
            self._close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self.beat = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self.beat.start()
        _HELD.add(self)
        return note

    def _open(self):
        """The lock file, created if absent; never through a symbolic link, nor a file of several links."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise LockedError(f"{self.what}: its lock file {self.path} is a symbolic link (to "
                              f"{os.readlink(self.path)}); a lock writes only a file it creates: remove the link") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"a file of {info.st_nlink} hard links"
            raise LockedError(f"{self.what}: its lock file {self.path} is {what}; a lock writes only a file it "
                              "creates: remove it")
        return os.fdopen(fd, "r+")

    @staticmethod
    def _record(handle) -> dict | None:
        try:
            handle.seek(0)
            record = json.loads(handle.read() or "null")
            return record if isinstance(record, dict) and {"host", "pid"} <= set(record) else None
        except (OSError, ValueError):
            return None

    def _holder(self, record: dict | None) -> str:
        if record is None:
            return f"another process (lock file {self.path})"
        return f"pid {record['pid']} on host {record['host']} (since {record.get('started', '?')}; lock file {self.path})"

    def _take_over(self, record: dict | None) -> str | None:
        """The flock is ours: decide about the record a previous holder may have left."""
        if record is None:
            return None
        if record["host"] == socket.gethostname():
            alive = record["pid"] != os.getpid() and process_alive(record["pid"])
            if alive and not self.flocked:
                raise LockedError(f"{self.what}: in use by {self._holder(record)}; one job at a time writes it")
            # with flock the kernel decides: a live process of that PID (a reused one) does not hold it
            return f"took over the lock of {self._holder(record)}: " + \
                ("that process no longer holds it (its PID is another process's now)" if alive else "that process is gone")
        age = time.time() - self.path.stat().st_mtime
        if age < STALE_S:
            raise LockedError(f"{self.what}: in use by {self._holder(record)}, alive {age:.0f} s ago; one job at a "
                              f"time writes it (if that job is gone, delete the lock file or wait {STALE_S - age:.0f} s)")
        return f"took over the lock of {self._holder(record)}: no sign of life for {age:.0f} s"

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.handle.fileno())  # the locked file itself, whatever is at the path now
            except (OSError, ValueError, AttributeError):  # released meanwhile: closed, or gone
                pass

    def _close(self) -> None:
        self.handle.close()
        self.handle = None

    def release(self) -> None:
        if self.handle is None:
            return
        _HELD.discard(self)
        self.stop.set()
        self.path.unlink(missing_ok=True)  # while still holding it: see acquire's inode check
        self._close()

    def __enter__(self) -> DirectoryLock:
        note = self.acquire()
        if note:
            print(f"note: {note}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hard_exit(code: int) -> None:
    """``os._exit(code)`` after releasing the locks this process holds: a rank ended by a watchdog or a
    save past its deadline leaves the directory free for the job that is requeued."""
    for lock in list(_HELD):
        lock.release()
    os._exit(code)
