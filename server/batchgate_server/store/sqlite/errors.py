"""SQLite's errors as the neutral storage errors of store/errors.py."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from batchgate_server.store.errors import Duplicate, StorageError, StorageFull, StorageUnavailable, disk_errors


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


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Raise every SQLite error, and a full disk, as the StorageError that says what happened."""
    try:
        with disk_errors():
            yield
    except sqlite3.Error as err:
        raise _from_sqlite(err) from err
