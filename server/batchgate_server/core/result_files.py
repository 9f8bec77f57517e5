"""An ended job's results as the batch's output and error files, with the usage they report
(ResultSink is what a sharded batch's merge, core/sharded.py, writes with too).

One place for both ways a batch ends with results: completed / cancelled / expired (the
tracker's _finish) and failed after the provider answered some requests (_fail_with: the
provider bills those, so they are kept and charged). The files are committed as blobs here;
recording them, the usage and the cost on the batch and in the ledger is the caller's terminal
transaction (and `discard` removes the blobs when that transaction does not happen).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable
from dataclasses import dataclass, field

from batchgate_server.core.accounting import UsageCounter
from batchgate_server.domain.models import BatchRecord, FilePurpose, FileRecord, RequestCounts
from batchgate_server.providers.base import ResultKind, ResultLine
from batchgate_server.store.ports import BlobStore

# ~5 ms of a long answer's work on the loop (a line costs ~10 us there), then a turn for other RPCs.
YIELD_EVERY_LINES = 500


class ResultSink:
    """Writes one result file while hashing it, in blocks of WRITE_BLOCK bytes (a blob write may
    cost a thread hop or a network call: never one per line); commits it only if it got lines.

    A block is hashed and written off the event loop (hashlib lets go of the GIL on large
    buffers) while the loop fills the next one: at most one block in flight, so memory stays at
    two blocks and the file's order (and its hash) is the lines' order."""

    WRITE_BLOCK = 1024 * 1024

    def __init__(self, blobs: BlobStore) -> None:
        self._writer = blobs.open_writer()
        self._hash = hashlib.sha256()
        # Lines joined once per block: a bytearray grown line by line reallocates (and copies) as
        # it grows, ~8x the block's bytes.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._in_flight: asyncio.Future[None] | None = None
        self.lines = 0
        self.bytes = 0

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data) + 1
        self.lines += 1
        self.bytes += len(data) + 1
        if self._pending_bytes >= self.WRITE_BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        self._pending.append(b"")  # the last line's newline
        block = b"\n".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await self._settle()
        self._in_flight = asyncio.ensure_future(self._store(block))

    async def _store(self, block: bytes) -> None:
        hashed = asyncio.get_running_loop().run_in_executor(None, self._hash.update, block)
        try:
            await self._writer.write(block)
        finally:
            await hashed

    async def _settle(self) -> None:
        """Wait for the block in flight (its failure raises here)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            await in_flight

    async def abort(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        if self._in_flight is not None:
            self._in_flight.cancel()
            await asyncio.gather(self._in_flight, return_exceptions=True)
            self._in_flight = None
        await self._writer.abort()

    async def commit(self, file_id: str, project: str, filename: str, now: float,
                     merged_into: str = "") -> FileRecord | None:
        if self.lines == 0:
            await self._writer.abort()
            return None
        if self._pending:
            await self._flush()
        await self._settle()
        await self._writer.commit(file_id)
        return FileRecord(id=file_id, project=project, filename=filename, purpose=FilePurpose.BATCH_OUTPUT,
                          bytes=self.bytes, sha256=self._hash.hexdigest(), created_at=now,
                          line_count=self.lines, merged_into=merged_into)


@dataclass
class CollectedResults:
    output_id: str
    error_id: str
    usage: UsageCounter | None
    out_lines: int = 0
    err_lines: int = 0
    files: list[FileRecord] = field(default_factory=list)  # committed blobs, not recorded yet

    def record_on(self, r: BatchRecord, total: int) -> None:
        """Put the files and counts on the batch (in the caller's terminal mutation)."""
        r.output_file_id = self.output_id if self.out_lines else ""
        r.error_file_id = self.error_id if self.err_lines else ""
        r.request_counts = RequestCounts(total=total or (self.out_lines + self.err_lines),
                                         completed=self.out_lines, failed=self.err_lines)

    async def discard(self, blobs: BlobStore) -> None:
        """The terminal transaction did not happen: a retry writes the files again, same ids."""
        for f in self.files:
            await blobs.delete(f.id)


async def collect_results(lines: AsyncIterable[ResultLine], blobs: BlobStore, rec: BatchRecord,
                          usage: UsageCounter | None, now: float) -> CollectedResults:
    """Write `lines` into the output and error files named by rec.result_file_ids, summing the
    usage of the output lines into `usage` (None: the caller knows the usage already, as a
    sharded batch's merge does from its shards). Nothing is left behind when it fails (or is
    cancelled)."""
    output_id, error_id = rec.result_file_ids
    sinks = {ResultKind.OUTPUT: ResultSink(blobs), ResultKind.ERROR: ResultSink(blobs)}
    try:
        written = 0
        async for line in lines:
            await sinks[line.kind].write(line.data)
            if usage is not None and line.kind is ResultKind.OUTPUT:
                usage.add_line(line.data)
            written += 1
            if written % YIELD_EVERY_LINES == 0:
                await asyncio.sleep(0)  # a 50k-line result must not stall every other RPC
    except BaseException:
        for sink in sinks.values():
            await sink.abort()
        raise
    collected = CollectedResults(output_id, error_id, usage, out_lines=sinks[ResultKind.OUTPUT].lines,
                                 err_lines=sinks[ResultKind.ERROR].lines)
    try:
        for kind, file_id in ((ResultKind.OUTPUT, output_id), (ResultKind.ERROR, error_id)):
            # A shard's files are its parent's to merge: internal (FileRecord.merged_into).
            record = await sinks[kind].commit(file_id, rec.project, f"{rec.id}_{kind.value}.jsonl", now,
                                              merged_into=rec.parent_id or "")
            if record is not None:
                collected.files.append(record)
    except BaseException:  # e.g. a full disk: neither file is kept, a retry writes both again
        for sink in sinks.values():
            await sink.abort()
        await collected.discard(blobs)
        raise
    return collected
