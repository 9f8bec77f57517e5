"""The Files use cases: streamed upload with validation, get, list, download, delete, expiry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from batchgate_server.core.pagination import PageTokens
from batchgate_server.core.auth import Principal
from batchgate_server.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, not_found
from batchgate_server.core.ids import new_file_id
from batchgate_server.core.jsonl_validation import JsonlValidator, ValidationResult
from batchgate_server.core.models import FilePurpose, FileRecord
from batchgate_server.store.blobs import BlobStore, BlobWriter
from batchgate_server.store.metadata import MetadataStore

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_FILENAME = 255
MAX_REQUEST_ID = 128
MAX_EXPIRES_AFTER = 30 * 24 * 3600


@dataclass
class UploadHeader:
    filename: str
    purpose: FilePurpose | None
    expected_bytes: int | None = None
    expected_sha256: str = ""
    request_id: str = ""
    expires_after: float | None = None


@dataclass
class FileLimits:
    max_bytes: int
    max_lines: int
    max_chunk_bytes: int


def _invalid(message: str, reason: str, field_name: str, description: str, **meta: str) -> InvalidArgument:
    return InvalidArgument(message, reason, dict(meta), [FieldViolation(field_name, description)])


def check_header(h: UploadHeader) -> None:
    if not h.filename or len(h.filename) > MAX_FILENAME:
        raise _invalid("header.filename must be 1 to 255 characters", "INVALID_FILENAME",
                       "header.filename", "1 to 255 characters")
    if h.purpose is None:
        raise _invalid("header.purpose must be FILE_PURPOSE_BATCH", "INVALID_PURPOSE",
                       "header.purpose", "required")
    if h.purpose is not FilePurpose.BATCH:
        raise _invalid("only FILE_PURPOSE_BATCH files can be uploaded; batch_output files are written by batches",
                       "INVALID_PURPOSE", "header.purpose", "must be FILE_PURPOSE_BATCH")
    if h.expected_bytes is not None and h.expected_bytes < 0:
        raise _invalid("header.expected_bytes must not be negative", "INVALID_EXPECTED_BYTES",
                       "header.expected_bytes", "must be >= 0")
    if h.expected_sha256 and not SHA256_HEX.match(h.expected_sha256):
        raise _invalid("header.expected_sha256 must be 64 lowercase hex characters", "INVALID_SHA256",
                       "header.expected_sha256", "64 lowercase hex characters")
    if len(h.request_id) > MAX_REQUEST_ID:
        raise _invalid("header.request_id is longer than 128 characters", "INVALID_REQUEST_ID",
                       "header.request_id", "at most 128 characters")
    if h.expires_after is not None and not (0 < h.expires_after <= MAX_EXPIRES_AFTER):
        raise _invalid("header.expires_after must be between 1 second and 30 days", "INVALID_EXPIRES_AFTER",
                       "header.expires_after", "1s to 30 days")


def _hash_and_write(hasher, writer: BlobWriter, chunk: bytes) -> None:
    hasher.update(chunk)
    writer.write(chunk)


def validation_error(result: ValidationResult) -> InvalidArgument:
    first = result.problems[0]
    where = f"line {first.line}" if first.line else "file"
    return InvalidArgument(
        f"the batch file has {result.total_problems} problem(s); first at {where}: {first.message}",
        "INVALID_BATCH_FILE",
        {"total_problems": str(result.total_problems), "reported_problems": str(len(result.problems)),
         "first_problem": first.code},
        [FieldViolation(f"line {p.line}" if p.line else "file", f"{p.code}: {p.message}")
         for p in result.problems],
    )


class FileManager:
    def __init__(self, store: MetadataStore, blobs: BlobStore, limits: FileLimits, page_tokens: PageTokens) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self.page_tokens = page_tokens
        # Set by the batch layer: which running batch reads this file, if any.
        self.used_by: Callable[[str], str | None] = lambda file_id: None

    # -- upload -----------------------------------------------------------------------

    async def upload(self, principal: Principal, header: UploadHeader, chunks: AsyncIterator[bytes],
                     client_gone: Callable[[], bool] = lambda: False) -> FileRecord:
        """Stream `chunks` into a new file. `client_gone` tells a finished stream from one the
        client abandoned: gRPC ends the request iterator quietly in both cases."""
        check_header(header)
        if header.request_id:
            previous = await self.store.get_file_by_request_id(principal.project, header.request_id)
            if previous is not None:
                return previous
        validator = JsonlValidator(max_lines=self.limits.max_lines, max_bytes=self.limits.max_bytes)
        hasher = hashlib.sha256()
        writer = self.blobs.open_writer()
        loop = asyncio.get_running_loop()
        size = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if len(chunk) > self.limits.max_chunk_bytes:
                    raise _invalid(f"a chunk of {len(chunk)} bytes exceeds the "
                                   f"{self.limits.max_chunk_bytes}-byte limit", "CHUNK_TOO_LARGE",
                                   "chunk", f"at most {self.limits.max_chunk_bytes} bytes")
                size += len(chunk)
                if header.expected_bytes is not None and size > header.expected_bytes:
                    raise _invalid(f"received more than the {header.expected_bytes} bytes the header announced",
                                   "SIZE_MISMATCH", "header.expected_bytes", "more bytes arrived")
                # Hashing and writing release the GIL: they run on the second core while this
                # thread validates the same chunk.
                stored = loop.run_in_executor(None, _hash_and_write, hasher, writer, chunk)
                try:
                    validator.feed(chunk)
                finally:
                    await stored
                if validator.too_large:
                    raise _invalid(f"the file exceeds the {self.limits.max_bytes}-byte limit", "FILE_TOO_LARGE",
                                   "file", f"at most {self.limits.max_bytes} bytes",
                                   max_bytes=str(self.limits.max_bytes))
            if header.expected_bytes is not None and size != header.expected_bytes:
                raise _invalid(f"received {size} bytes, the header announced {header.expected_bytes}",
                               "SIZE_MISMATCH", "header.expected_bytes", f"received {size}")
            digest = hasher.hexdigest()
            if header.expected_sha256 and digest != header.expected_sha256:
                raise _invalid("the content's sha256 does not match header.expected_sha256", "SHA256_MISMATCH",
                               "header.expected_sha256", f"content hashes to {digest}", sha256=digest)
            # A cancelled call ends the request stream as quietly as a finished one; the
            # cancellation reaches this task on its next await. Yield once so a truncated
            # upload is discarded instead of committed.
            await asyncio.sleep(0)
            if client_gone():
                raise asyncio.CancelledError("the client cancelled the upload")
            result = validator.finish()
            if not result.ok:
                raise validation_error(result)
            now = time.time()
            record = FileRecord(
                id=new_file_id(), project=principal.project, filename=header.filename,
                purpose=FilePurpose.BATCH, bytes=size, sha256=digest, created_at=now,
                expires_at=now + header.expires_after if header.expires_after else None,
                line_count=result.line_count, endpoint=result.endpoint, model=result.model,
                request_id=header.request_id,
            )
        except BaseException:
            # Covers validation errors, a client that hung up (CancelledError) and bugs alike.
            writer.abort()
            raise
        # From here on the upload is complete: blob and record are written together even if
        # the caller goes away now (it can replay with its request_id).
        return await asyncio.shield(self._commit(writer, record, header))

    async def _commit(self, writer: BlobWriter, record: FileRecord, header: UploadHeader) -> FileRecord:
        try:
            await asyncio.to_thread(writer.commit, record.id)  # fsync: not on the event loop
        except BaseException:
            writer.abort()
            raise
        try:
            await self.store.insert_file(record)
        except sqlite3.IntegrityError:
            # Two uploads raced with the same request_id: the first one wins.
            self.blobs.delete(record.id)
            previous = await self.store.get_file_by_request_id(record.project, header.request_id)
            if previous is None:
                raise
            return previous
        except BaseException:
            self.blobs.delete(record.id)
            raise
        log.info("file %s uploaded: %d bytes, %d lines, project %s", record.id, record.bytes, record.line_count,
                 record.project)
        return record

    # -- reads ------------------------------------------------------------------------

    async def get(self, principal: Principal, file_id: str) -> FileRecord:
        if not file_id:
            raise _invalid("file_id is required", "MISSING_FILE_ID", "file_id", "required")
        record = await self.store.get_file(file_id)
        if record is None or not principal.can_see(record.project):
            raise not_found("file", file_id)
        return record

    async def list(self, principal: Principal, size: int, token: str, purpose: FilePurpose | None,
                   weigh: Callable[[FileRecord], int]) -> tuple[list[FileRecord], str]:
        """A page of files (see PageTokens.keyset_page; `weigh`: a file's size in the response)."""
        filter_key = json.dumps(["files", principal.scope, purpose.value if purpose else ""])
        return await self.page_tokens.keyset_page(
            size, token, filter_key,
            lambda limit, after: self.store.list_files(principal.scope, purpose.value if purpose else None,
                                                       limit, after), weigh)

    def read(self, record: FileRecord, offset: int, limit: int) -> Iterator[bytes]:
        if offset < 0 or limit < 0:
            raise _invalid("read_offset and read_limit must not be negative", "INVALID_RANGE",
                           "read_offset" if offset < 0 else "read_limit", "must be >= 0")
        if offset > record.bytes:
            raise _invalid(f"read_offset {offset} is past the end of the file ({record.bytes} bytes)",
                           "INVALID_RANGE", "read_offset", f"at most {record.bytes}")
        if not self.blobs.exists(record.id):
            raise FailedPrecondition(f"the bytes of file {record.id} are missing from the blob store",
                                     "FILE_CONTENT_MISSING", {"file_id": record.id})
        return self.blobs.read(record.id, offset, limit)

    async def delete(self, principal: Principal, file_id: str) -> None:
        record = await self.get(principal, file_id)
        batch_id = self.used_by(record.id) or await self.store.active_batch_reading(record.id)
        if batch_id is not None:
            raise FailedPrecondition(f"file {record.id} is the input of batch {batch_id}, which is still running;"
                                     " cancel it or wait for it to end", "FILE_IN_USE",
                                     {"file_id": record.id, "batch_id": batch_id})
        await self.store.delete_file(record.id)
        self.blobs.delete(record.id)

    # -- housekeeping -----------------------------------------------------------------

    async def sweep_expired(self, now: float | None = None) -> int:
        removed = 0
        for record in await self.store.expired_files(now or time.time()):
            if await self.store.active_batch_reading(record.id):
                continue  # a running batch still reads it: it goes once that batch has ended
            await self.store.delete_file(record.id)
            self.blobs.delete(record.id)
            removed += 1
        if removed:
            log.info("deleted %d expired file(s)", removed)
        return removed

    async def remove_orphan_blobs(self) -> int:
        """Blobs whose record was never written (a crash between commit and insert)."""
        known = await self.store.all_file_ids()
        orphans = [k for k in self.blobs.keys() if k not in known]
        for key in orphans:
            self.blobs.delete(key)
        return len(orphans)

    async def run_expiry_sweeps(self, interval: float) -> None:
        while True:
            try:
                await self.sweep_expired()
            except Exception:  # keep sweeping; a failed sweep is retried next time
                log.exception("expiry sweep failed")
            await asyncio.sleep(interval)
