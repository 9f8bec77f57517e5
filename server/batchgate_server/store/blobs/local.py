"""The blob store on local disk (store.ports.BlobStore): each blob a file, written through a
temporary file and committed with an atomic rename, so a crash never leaves a half-written blob.
A full disk is StorageFull, and a write that meets it removes its temporary file.

Every blocking file operation runs on a worker thread of the loop's default executor, never on
the event loop: one thread hop per block written or read (callers move blocks of 256 KiB to a few
MiB, so the hop costs well under a percent of the I/O).

Layout under the root: `blobs/<last two characters of the key>/<key>` for committed blobs,
`tmp/<random>.part` for blobs being written (cleared at start-up: see `open`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from batchgate_server.store.errors import disk_errors
from batchgate_server.store.ports import DEFAULT_READ_CHUNK, BlobStore, BlobWriter
from batchgate_server.store.urls import StoreUrl

log = logging.getLogger(__name__)

# A temporary file this old belongs to no running writer (uploads time out after a minute idle).
STALE_TEMPORARY = 3600.0

T = TypeVar("T")


def _on_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`fn(*args)` on a worker thread. The work is handed to the thread at once (before the
    caller's next await), so a caller can overlap it with work of its own on the loop."""
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


class LocalBlobWriter(BlobWriter):
    def __init__(self, store: LocalBlobStore) -> None:
        self._store = store
        self._tmp = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._fh = None  # opened by the first write (opening a writer does no I/O)
        self._size = 0
        self._done = False
        # A write cancelled on the loop goes on on its thread: an abort waits for it to finish,
        # so the file it may still create is removed.
        self._lock = threading.Lock()

    def _open(self):
        if self._fh is None:
            self._fh = open(self._tmp, "wb")
        return self._fh

    def _write(self, data: bytes) -> None:
        with self._lock, disk_errors():
            if self._done:
                raise ValueError("write to an aborted or committed blob writer")
            self._open().write(data)
            self._size += len(data)

    async def write(self, data: bytes) -> None:
        try:
            await _on_thread(self._write, data)
        except BaseException:
            await self.abort()
            raise

    def _commit(self, key: str) -> int:
        final = self._store._path(key)
        with self._lock, disk_errors():
            if self._done:
                raise ValueError("commit of an aborted or committed blob writer")
            fh = self._open()
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, final)
            self._done = True
        return self._size

    async def commit(self, key: str) -> int:
        try:
            return await _on_thread(self._commit, key)
        except BaseException:
            await self.abort()
            raise

    def _abort(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            if self._fh is not None:
                try:
                    self._fh.close()
                except OSError:
                    pass  # flushing the buffer failed (a full disk): the bytes are discarded anyway
            self._tmp.unlink(missing_ok=True)

    async def abort(self) -> None:
        # Shielded: an abort that is itself cancelled still removes the temporary file.
        await asyncio.shield(_on_thread(self._abort))


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        """Creates the directories (a blocking call: use `open` on a running loop)."""
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.blob_dir = self.root / "blobs"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    async def open(cls, root: Path, *, exclusive: bool = True) -> LocalBlobStore:
        """The store at `root`, with the temporary files of writes a crash interrupted removed:
        all of them when `exclusive` (the root is in this server's locked data directory, so no
        other server writes there), else only those untouched for STALE_TEMPORARY seconds (the
        directory may be shared)."""
        store = await asyncio.to_thread(cls, root)
        leftovers = await asyncio.to_thread(store._clear_temporary, None if exclusive else STALE_TEMPORARY)
        if leftovers:
            log.info("removed %d temporary upload(s) left by an earlier run", leftovers)
        return store

    def _clear_temporary(self, older_than: float | None) -> int:
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if older_than is not None:
                try:
                    if time.time() - entry.stat().st_mtime < older_than:
                        continue
                except FileNotFoundError:
                    continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad blob key {key!r}")
        return self.blob_dir / key[-2:] / key

    def open_writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    async def read(self, key: str, offset: int = 0, limit: int = 0,
                   chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncIterator[bytes]:
        if offset < 0 or limit < 0 or chunk_size <= 0:
            raise ValueError(f"bad range: offset {offset}, limit {limit}, chunk_size {chunk_size}")
        path = self._path(key)
        try:
            fh = await _on_thread(open, path, "rb", 0)  # unbuffered: every read is one block we asked for
        except FileNotFoundError:
            raise KeyError(key) from None
        try:
            remaining = limit if limit > 0 else None
            if offset:
                fh.seek(offset)  # moves the file position only: no I/O
            while remaining is None or remaining > 0:
                data = await _on_thread(fh.read, chunk_size if remaining is None else min(chunk_size, remaining))
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            fh.close()  # a read-only descriptor: nothing to flush

    async def delete(self, key: str) -> bool:
        path = self._path(key)

        def unlink() -> bool:
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return False

        return await _on_thread(unlink)

    async def exists(self, key: str) -> bool:
        return await _on_thread(self._path(key).exists)

    async def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return (await _on_thread(path.stat)).st_size
        except FileNotFoundError:
            raise KeyError(key) from None

    async def keys(self) -> AsyncIterator[str]:
        def listing() -> list[str]:
            return [entry.name for shard in self.blob_dir.iterdir() for entry in shard.iterdir()]

        for key in await _on_thread(listing):
            yield key


async def open_blob_store(url: StoreUrl, data_dir: Path) -> LocalBlobStore:
    """`file:///abs/path` (store/urls.py)."""
    root = url.local_path()
    return await LocalBlobStore.open(root, exclusive=root.resolve().is_relative_to(data_dir.resolve()))
