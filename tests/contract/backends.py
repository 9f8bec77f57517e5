"""The implementations the contract suites run against, by name.

A backend is an async context manager factory `(request, tmp_path) -> Backend`: the Backend opens
handles on one fresh, empty database (or bucket prefix) — two handles are two servers sharing it —
and removes what it made on exit. `request` lets a factory use session fixtures (a PostgreSQL
server, a moto or GCS emulator): `request.getfixturevalue("…")`.

To run the suites on another implementation, add one entry to METADATA_BACKENDS or BLOB_BACKENDS.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from batchgate_server.store.blobs.local import LocalBlobStore
from batchgate_server.store.ports import BlobStore
from batchgate_server.store.urls import Database, blob_url, database_url, open_blob_store, open_database

H = TypeVar("H")


@dataclass
class Backend(Generic[H]):
    """Opens handles on one shared store; closes every handle it opened on exit."""

    name: str
    opener: Callable[[], Awaitable[H]]
    # Blob stores: what a handle holds in staging (temporary files, unfinished multipart uploads,
    # resumable sessions), so the suite can check an aborted writer leaves nothing; None: unknown.
    staging: Callable[[H], Awaitable[list[str]]] | None = None
    opened: list[Any] = field(default_factory=list)

    async def open(self) -> H:
        handle = await self.opener()
        self.opened.append(handle)
        return handle

    async def close(self) -> None:
        for handle in reversed(self.opened):
            await handle.close()
        self.opened.clear()


BackendFactory = Callable[[Any, Path], contextlib.AbstractAsyncContextManager[Backend]]


@contextlib.asynccontextmanager
async def sqlite_database(request, tmp_path: Path) -> AsyncIterator[Backend[Database]]:
    data_dir = tmp_path / "sqlite"
    data_dir.mkdir()
    url = database_url("", data_dir)
    backend = Backend("sqlite", lambda: open_database(url, data_dir))
    try:
        yield backend
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def local_blobs(request, tmp_path: Path) -> AsyncIterator[Backend[BlobStore]]:
    data_dir = tmp_path / "local"
    data_dir.mkdir()
    url = blob_url("", data_dir)
    async def staging(store: LocalBlobStore) -> list[str]:
        return sorted(p.name for p in store.tmp_dir.iterdir())

    backend = Backend("local", lambda: open_blob_store(url, data_dir), staging)
    try:
        yield backend
    finally:
        await backend.close()


METADATA_BACKENDS: dict[str, BackendFactory] = {
    "sqlite": sqlite_database,
}
BLOB_BACKENDS: dict[str, BackendFactory] = {
    "local": local_blobs,
}
