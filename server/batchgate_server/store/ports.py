"""The storage ports core depends on; implementations live beside them (SQLite or PostgreSQL for
metadata, local disk, S3 or GCS for blobs) and app.py is the only place that picks one.

Every method may raise the neutral errors of `store.errors` (StorageFull, StorageUnavailable, …) and
nothing backend-specific: no `sqlite3`, `OSError`, botocore or google.api_core exception crosses
into core/.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable

DEFAULT_READ_CHUNK = 256 * 1024


class BlobWriter(abc.ABC):
    """One new blob being written. Nothing is visible under any key until `commit`; a writer that
    is aborted, or never committed (the process died), leaves no object behind that a reader or
    `keys()` would see (implementations clean up their staging: temp files, multipart uploads,
    resumable sessions)."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Append `data`. Implementations buffer at most one part (e.g. an S3 multipart part) in
        memory: memory stays flat whatever the blob's size. StorageFull aborts the writer."""

    @abc.abstractmethod
    async def commit(self, key: str) -> int:
        """Make the written bytes visible under `key` atomically (all or nothing) and durably;
        returns the size. Committing over an existing key replaces it (a finalisation redone after
        a crash rewrites the same ids)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything written. Safe to call more than once, and after commit (then a no-op)."""


class BlobStore(abc.ABC):
    """Immutable blobs by key. Keys are opaque ids such as `file-…` (no `/`, no leading `.`)."""

    @abc.abstractmethod
    def open_writer(self) -> BlobWriter:
        """A writer for a new blob (cheap: no I/O happens until the first write)."""

    @abc.abstractmethod
    def read(self, key: str, offset: int = 0, limit: int = 0,
             chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncIterator[bytes]:
        """The bytes of `key` from `offset`, at most `limit` bytes (0: to the end), in chunks of at
        most `chunk_size`. A missing key raises KeyError on the first iteration."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove `key`; False when there was none. Works on a full disk."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """The size of `key`; KeyError when missing."""

    @abc.abstractmethod
    def keys(self) -> AsyncIterator[str]:
        """Every committed key (for housekeeping such as removing blobs without a record)."""

    async def close(self) -> None:
        """Release clients and connection pools at shutdown."""


ChangeListener = Callable[[str, int], None]


class ChangeFeed(abc.ABC):
    """Batch changes committed by any replica on this database, as (batch id, revision): a wake-up
    only. A listener reads the batch itself (a notification may be late, coalesced or lost: the
    revision, never the payload, says what is new). PostgreSQL: LISTEN/NOTIFY; SQLite: in-process."""

    @abc.abstractmethod
    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener(batch_id, revision)` on the event loop for every change heard from now
        on; returns the function that unsubscribes. Listeners must not block."""

    @abc.abstractmethod
    def notify(self, batch_id: str, revision: int) -> None:
        """Announce a change this process committed (implementations whose database announces
        commits itself ignore it)."""

    async def close(self) -> None:
        """Stop listening."""
