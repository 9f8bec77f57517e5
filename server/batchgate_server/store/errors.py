"""Storage errors the store raises, neutral of the backend: implementations translate their own
(sqlite3, OSError, a driver's or a cloud client's) into these, and nothing else crosses into
core/."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class StorageError(Exception):
    """The store failed on its own account (not the caller's input)."""


class StorageFull(StorageError):
    """The disk (or the database) is full: writes fail until space is freed; reads still work."""


class StorageUnavailable(StorageError):
    """Busy, locked or failing I/O: worth retrying later."""


class Duplicate(StorageError):
    """A unique key (such as a request_id) is taken already."""


class QuotaReached(Exception):
    """An insert would pass the limit it was given (checked in the insert's own transaction):
    nothing was written. `current`: the project's use without this insert."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the limit is reached: {current} in use")
        self.current = current


class RevisionConflict(StorageError):
    """The batch changed since it was read (someone else wrote it)."""


class LeaseLost(StorageError):
    """The write was refused because another replica owns the batch now (this one's lease
    expired and it was adopted): the writer must stop driving it."""


def is_full(err: OSError) -> bool:
    return err.errno in _FULL_ERRNOS


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """A full disk raised as StorageFull (for stores on a local file system)."""
    try:
        yield
    except OSError as err:
        if is_full(err):
            raise StorageFull(str(err)) from err
        raise
