"""Checksums of checkpoint files, computed from the bytes as they are written (no second read):
``HashingWriter`` wraps a binary stream, ``HashingFileSystem`` gives DCP's file-system writer such
streams, and ``file_digest`` reads a file back for verification. SHA-256 (OpenSSL's, with the CPU's
SHA extensions where present: ~1.2 GB/s a core on this project's CPU machine)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

ALGORITHM = "sha256"
CHUNK = 16 << 20


class HashingWriter:
    """A binary stream that hashes and counts what passes through ``write``; everything else is the
    wrapped stream's. Streams written front to back only (as DCP's writer and ``torch.save`` do).
    ``failure``: the OSError a write raised (``torch.save``'s zip writer reports it as another error)."""

    def __init__(self, raw):
        self.raw, self.hash, self.bytes = raw, hashlib.new(ALGORITHM), 0
        self.failure: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.bytes += view.nbytes
        try:
            return self.raw.write(data)
        except OSError as error:
            self.failure = self.failure or error
            raise

    def entry(self) -> dict:
        """What ``files.json`` records of the file: its size and checksum."""
        return {"bytes": self.bytes, ALGORITHM: self.hash.hexdigest()}

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


class HashingFileSystem(FileSystem):
    """DCP's local file system, recording each written file's ``entry`` by file name (renames
    followed: DCP writes ``.metadata`` under a temporary name) and the first OSError of a write."""

    def __init__(self):
        super().__init__()
        self.entries: dict[str, dict] = {}
        self.failure: OSError | None = None

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = HashingWriter(raw)
            try:
                yield stream
            finally:
                self.failure = self.failure or stream.failure
        self.entries[Path(path).name] = stream.entry()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        entry = self.entries.pop(Path(path).name, None)
        if entry is not None:
            self.entries[Path(new_path).name] = entry


def hashing_writer(directory: Path) -> tuple[FileSystemWriter, HashingFileSystem]:
    """A DCP writer into ``directory`` whose files are hashed as they are written."""
    writer = FileSystemWriter(str(directory))
    writer.fs = HashingFileSystem()
    return writer, writer.fs


def file_digest(path: Path) -> str:
    digest, buffer = hashlib.new(ALGORITHM), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()
