"""Storage errors the store raises, neutral of the backend (SQLite and local files today): no
`sqlite3` or `OSError` of the store's own crosses into core/."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
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


class RevisionConflict(StorageError):
    """The batch changed since it was read (someone else wrote it)."""


class LeaseLost(StorageError):
    """The write was refused because another replica owns the batch now (this one's lease
    expired and it was adopted): the writer must stop driving it."""


def _from_sqlite(err: sqlite3.Error) -> StorageError:
    if isinstance(err, sqlite3.IntegrityError):
        return Duplicate(str(err))
    primary = (getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF
    if primary == sqlite3.SQLITE_FULL:
        return StorageFull(str(err))
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN,
                   sqlite3.SQLITE_PROTOCOL):
        return StorageUnavailable(str(err))
    return StorageError(f"{type(err).__name__}: {err}")


def is_full(err: OSError) -> bool:
    return err.errno in _FULL_ERRNOS


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Raise every SQLite error, and a full disk, as the StorageError that says what happened."""
    try:
        yield
    except sqlite3.Error as err:
        raise _from_sqlite(err) from err
    except OSError as err:
        if is_full(err):
            raise StorageFull(str(err)) from err
        raise
