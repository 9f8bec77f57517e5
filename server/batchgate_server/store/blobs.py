"""Blob store: file bytes on local disk, written through a temporary file and
committed with an atomic rename so a crash never leaves a half-written blob. A full disk is
StorageFull, and a write that meets it removes its temporary file."""

from __future__ import annotations

import abc
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from batchgate_server.store.errors import storage_errors


class BlobWriter(abc.ABC):
    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Raises StorageFull when the disk is full (the writer is aborted then)."""

    @abc.abstractmethod
    def commit(self, key: str) -> None:
        """Make the written bytes visible under `key` atomically. Raises StorageFull when the disk
        is full (the writer is aborted then)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard everything written. Safe to call more than once, and after commit."""


class BlobStore(abc.ABC):
    @abc.abstractmethod
    def open_writer(self) -> BlobWriter: ...

    @abc.abstractmethod
    def read(self, key: str, offset: int = 0, limit: int = 0, chunk_size: int = 256 * 1024) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> bool: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def keys(self) -> Iterator[str]: ...


class LocalBlobWriter(BlobWriter):
    def __init__(self, store: "LocalBlobStore") -> None:
        self._store = store
        self._tmp = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        with storage_errors():
            self._fh = open(self._tmp, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        try:
            with storage_errors():
                self._fh.write(data)
        except BaseException:
            self.abort()
            raise

    def commit(self, key: str) -> None:
        try:
            with storage_errors():
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                final = self._store.path(key)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._tmp, final)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._fh.close()
        except OSError:
            pass  # flushing the buffer failed (a full disk): the bytes are discarded anyway
        self._tmp.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.blob_dir = self.root / "blobs"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    def clear_temporary(self) -> int:
        """Remove temp files of uploads a crash interrupted. Call only at start-up."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad blob key {key!r}")
        return self.blob_dir / key[-2:] / key

    def open_writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    def read(self, key: str, offset: int = 0, limit: int = 0, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
        remaining = limit if limit > 0 else None
        with open(self.path(key), "rb") as fh:
            fh.seek(offset)
            while remaining is None or remaining > 0:
                want = chunk_size if remaining is None else min(chunk_size, remaining)
                data = fh.read(want)
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data

    def delete(self, key: str) -> bool:
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def keys(self) -> Iterator[str]:
        for shard in self.blob_dir.iterdir():
            for entry in shard.iterdir():
                yield entry.name
