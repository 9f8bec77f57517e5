"""Writing a batch's result files (batch_output purpose): what a single job's runner and a
sharded batch's merge (core/sharded.py) both write with."""

from __future__ import annotations

import hashlib

from batchgate_server.domain.models import FilePurpose, FileRecord
from batchgate_server.store.ports import BlobStore


class ResultSink:
    """Writes one result file while hashing it, in blocks of WRITE_BLOCK bytes (a blob write may
    cost a thread hop or a network call: never one per line); commits it only if it got lines."""

    WRITE_BLOCK = 1024 * 1024

    def __init__(self, blobs: BlobStore) -> None:
        self._writer = blobs.open_writer()
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self.lines = 0
        self.bytes = 0

    async def write(self, data: bytes) -> None:
        self._pending += data
        self._pending += b"\n"
        self.lines += 1
        self.bytes += len(data) + 1
        if len(self._pending) >= self.WRITE_BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        block = bytes(self._pending)
        self._pending.clear()
        self._hash.update(block)
        await self._writer.write(block)

    async def abort(self) -> None:
        self._pending.clear()
        await self._writer.abort()

    async def commit(self, file_id: str, project: str, filename: str, now: float) -> FileRecord | None:
        if self.lines == 0:
            await self._writer.abort()
            return None
        if self._pending:
            await self._flush()
        await self._writer.commit(file_id)
        return FileRecord(id=file_id, project=project, filename=filename, purpose=FilePurpose.BATCH_OUTPUT,
                          bytes=self.bytes, sha256=self._hash.hexdigest(), created_at=now,
                          line_count=self.lines)
