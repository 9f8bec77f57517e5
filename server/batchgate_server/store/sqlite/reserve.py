"""Space held back on the data directory's filesystem so deletes work on a full disk.

In WAL mode even a DELETE writes its pages to the write-ahead log first, and moving the log into
the database (a checkpoint) may need new pages there, so on a disk filled to the last byte (by us
or by anything else on it) no row could be deleted, and no space freed through the API; a restart
could not even open the database (SQLite creates its WAL and shared-memory files again). The
reserve is a file of real, allocated blocks in the data directory: a delete or an open that finds
no room releases it (SqliteMetadataStore), the freed blob gives the space back, and the next write
refills the reserve from whatever space there is by then.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from batchgate_server.store.errors import is_full

log = logging.getLogger(__name__)

# Room for a few hundred single-row deletes in the WAL (each a handful of 4 KiB pages).
RESERVE_BYTES = 1024 * 1024
_STEP = 64 * 1024


class SpaceReserve:
    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        """Takes no space yet (see refill); `held` is what an earlier run left."""
        self.path = path
        self.size = size
        self.held = path.stat().st_size if path.exists() else 0

    @property
    def short(self) -> bool:
        return self.held < self.size

    def refill(self) -> None:
        """Allocate the reserve up to its size, as far as free space allows (in steps, so a nearly
        full disk still gives what it has). Best effort: it never fails a write."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if not is_full(err):
                log.warning("cannot create the space reserve %s: %s", self.path, err)
                self.size = self.held
            return
        try:
            self.held = os.fstat(fd).st_size
            while self.held < self.size:
                step = min(_STEP, self.size - self.held)
                os.posix_fallocate(fd, self.held, step)
                self.held += step
        except OSError as err:
            if not is_full(err):  # not a matter of space: do not try again on every write
                log.warning("cannot allocate the space reserve %s: %s; keeping %d bytes", self.path, err, self.held)
                self.size = self.held
        finally:
            os.close(fd)

    def release(self, why: str) -> None:
        log.warning("the disk is full: releasing the %d-byte space reserve at %s %s", self.held, self.path, why)
        self.path.unlink(missing_ok=True)
        self.held = 0
