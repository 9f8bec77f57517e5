"""asyncpg's errors as the neutral StorageErrors of store/errors.py: no driver exception leaves
store/postgres.

By SQLSTATE class: a unique violation is Duplicate; a full disk (53100) is StorageFull; a lost
connection, a server shutting down or refusing connections, too many connections, a statement
cancelled, a serialization failure or deadlock are StorageUnavailable (worth retrying); anything
else is a plain StorageError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from batchgate_server.store.errors import Duplicate, StorageError, StorageFull, StorageUnavailable

UNIQUE_VIOLATION = "23505"
DISK_FULL = "53100"
# 08 connection exceptions, 53 insufficient resources (too many connections, out of memory),
# 57 operator intervention (pg_terminate_backend, shutdown, cannot connect now, query cancelled),
# 58 system errors (I/O), 40001 serialization failure, 40P01 deadlock, 55P03 lock not available,
# 25006 read-only transaction (a standby after a failover).
_RETRYABLE_CLASSES = ("08", "53", "57", "58")
_RETRYABLE_CODES = ("40001", "40P01", "55P03", "25006")


def from_driver(err: Exception) -> StorageError:
    if isinstance(err, asyncpg.PostgresError):
        code = err.sqlstate or ""
        if code == UNIQUE_VIOLATION:
            return Duplicate(str(err))
        if code == DISK_FULL:
            return StorageFull(str(err))
        if code[:2] in _RETRYABLE_CLASSES or code in _RETRYABLE_CODES:
            return StorageUnavailable(f"{type(err).__name__}: {err}")
        return StorageError(f"{type(err).__name__}: {err}")
    if is_connection_lost(err):
        return StorageUnavailable(f"the database connection failed: {type(err).__name__}: {err}")
    return StorageError(f"{type(err).__name__}: {err}")


def is_connection_lost(err: BaseException) -> bool:
    """The connection broke (or never opened) before an answer came: nothing the server said.
    asyncpg's InternalClientError is a connection left in a state it cannot go on from (a
    statement cut off by the connection's end; a statement cache outdated by another server's
    migration): we never share a connection between two callers, so nothing else raises it."""
    return isinstance(err, (asyncpg.ConnectionDoesNotExistError, asyncpg.exceptions.ConnectionFailureError,
                            asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CannotConnectNowError,
                            asyncpg.InternalClientError, OSError)) or (
        isinstance(err, asyncpg.InterfaceError) and "connection is closed" in str(err))


@contextlib.contextmanager
def pg_errors() -> Iterator[None]:
    """Raise every driver error (and a failed connect) as the StorageError that says what happened."""
    try:
        yield
    except StorageError:
        raise
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError) as err:
        raise from_driver(err) from err
