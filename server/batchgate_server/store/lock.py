"""One server per data directory: an exclusive lock on a file in it, held while the server runs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "batchgate.lock"


class DataDirInUse(Exception):
    """Another process holds the data directory."""


class DataDirLock:
    """An flock(2) on `data_dir/batchgate.lock`. The kernel drops it with its holder, however that
    process ends (kill -9 included), so a crash never leaves a stale lock behind. The file holds
    the holder's pid for the error message; it is never deleted (deleting it would let a second
    server lock a new file while the first still holds the old one)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"data directory {self.data_dir} is in use by another batchgate-server"
                               f" (pid {holder}); stop it first or use another --data-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the pid is missing from the message
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
