"""The implementations the contract suites run against, by name.

A backend is an async context manager factory `(request, tmp_path) -> Backend`: the Backend opens
handles on one fresh, empty database (or bucket prefix) — two handles are two servers sharing it —
and removes what it made on exit. `request` lets a factory use session fixtures (a PostgreSQL
server, a moto or GCS emulator): `request.getfixturevalue("…")`.

To run the suites on another implementation, add one entry to METADATA_BACKENDS or BLOB_BACKENDS.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from batchgate_server.store.blobs.local import LocalBlobStore
from batchgate_server.store.ports import BlobStore
from batchgate_server.store.urls import Database, blob_url, database_url, open_blob_store, open_database
from tests.backends_objects import new_bucket_name

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
async def postgres_database(request, tmp_path: Path) -> AsyncIterator[Backend[Database]]:
    """A fresh database on the session's PostgreSQL server (tests/backends_pg.py)."""
    server = request.getfixturevalue("postgres_server")
    text = server.create_database()
    url = database_url(text, tmp_path)
    backend = Backend("postgres", lambda: open_database(url, tmp_path))
    try:
        yield backend
    finally:
        await backend.close()
        server.drop_database(text)


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


def _remote_blobs(name: str, scheme: str, emulator_fixture: str, env: Callable[[Any], dict[str, str]],
                  make_bucket: Callable[[Any], str], staged: Callable[[Any, str], list[str]]) -> BackendFactory:
    """A factory for an object store on its emulator (tests/backends_objects.py): a fresh bucket
    per test, the prefix `contract`; staging is what is left under `contract/.staging/`
    (multipart uploads and objects), read from the emulator itself."""

    @contextlib.asynccontextmanager
    async def factory(request, tmp_path: Path) -> AsyncIterator[Backend[BlobStore]]:
        emulator = request.getfixturevalue(emulator_fixture)
        bucket = await asyncio.to_thread(make_bucket, emulator)
        url = blob_url(f"{scheme}://{bucket}/contract", tmp_path)

        async def opener() -> BlobStore:
            with pytest.MonkeyPatch.context() as mp:  # the stores read their endpoint when opened
                for key, value in env(emulator).items():
                    mp.setenv(key, value)
                return await open_blob_store(url, tmp_path)

        async def staging(store: BlobStore) -> list[str]:
            return await asyncio.to_thread(staged, emulator, bucket)

        backend = Backend(name, opener, staging)
        try:
            yield backend
        finally:
            await backend.close()

    return factory


def _s3_staged(moto, bucket: str) -> list[str]:
    s3 = moto.client()
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix="contract/.staging/").get("Uploads", ())
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="contract/.staging/").get("Contents", ())
    return sorted([f"upload {u['Key']}" for u in uploads] + [o["Key"] for o in objects])


def _gcs_staged(emulator, bucket: str) -> list[str]:
    return sorted(b.name for b in emulator.client().list_blobs(bucket, prefix="contract/.staging/"))


def _s3_bucket(moto) -> str:
    bucket = new_bucket_name()
    moto.client().create_bucket(Bucket=bucket)
    return bucket


def _gcs_bucket(emulator) -> str:
    bucket = new_bucket_name()
    emulator.client().create_bucket(bucket)
    return bucket


s3_blobs = _remote_blobs("s3", "s3", "moto_s3", lambda moto: {"BATCHGATE_S3_ENDPOINT_URL": moto.url},
                         _s3_bucket, _s3_staged)
gcs_blobs = _remote_blobs("gcs", "gs", "gcs_emulator", lambda emulator: {"STORAGE_EMULATOR_HOST": emulator.url},
                          _gcs_bucket, _gcs_staged)


METADATA_BACKENDS: dict[str, BackendFactory] = {
    "sqlite": sqlite_database,
    "postgres": postgres_database,
}
BLOB_BACKENDS: dict[str, BackendFactory] = {
    "local": local_blobs,
    "s3": s3_blobs,
    "gcs": gcs_blobs,
}
