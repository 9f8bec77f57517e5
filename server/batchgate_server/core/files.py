"""The Files use cases: streamed upload with validation, get, list, download, delete, expiry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import Counter
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from batchgate_server.core.auth import Principal
from batchgate_server.core.pagination import PageTokens, after_cursor, keyset_rows
from batchgate_server.core.errors import invalid_field as _invalid
from batchgate_server.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    exhausted_when_full,
    is_utf8_text,
    not_found,
)
from batchgate_server.core.jsonl_validation import ValidationResult
from batchgate_server.core.quotas import Quotas
from batchgate_server.core.upload_validation import UploadValidation, ValidationWorkers
from batchgate_server.domain.ids import new_file_id
from batchgate_server.domain.models import FilePurpose, FileRecord
from batchgate_server.store.errors import Duplicate
from batchgate_server.store.ports import BlobStore, BlobWriter, MetadataStore

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Characters, not bytes: the name is never a path on disk. Control characters (C0, DEL, C1)
# are refused: a NUL or a newline in a name breaks logs, terminals and Content-Disposition.
MAX_FILENAME = 255
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
MAX_REQUEST_ID = 128
MIN_EXPIRES_AFTER = 1
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
    # Seconds an upload may wait for its next message: a client that sends a header and then
    # nothing would otherwise hold a temp file and a descriptor forever.
    upload_idle_timeout: float = 60.0
    max_uploads_per_project: int = 8


def check_header(h: UploadHeader) -> None:
    if not h.filename or len(h.filename) > MAX_FILENAME:
        raise _invalid("header.filename must be 1 to 255 characters", "INVALID_FILENAME",
                       "header.filename", "1 to 255 characters")
    if not is_utf8_text(h.filename):
        raise _invalid("header.filename must be UTF-8 text", "INVALID_FILENAME", "header.filename", "UTF-8 text")
    if control := CONTROL_CHARACTER.search(h.filename):
        raise _invalid(f"header.filename must not hold control characters; character {control.start() + 1} is "
                       f"U+{ord(control.group()):04X}", "INVALID_FILENAME", "header.filename",
                       "no control characters")
    if h.purpose is None:
        raise _invalid('header.purpose must be FILE_PURPOSE_BATCH ("batch" over HTTP)', "INVALID_PURPOSE",
                       "header.purpose", "required")
    if h.purpose is not FilePurpose.BATCH:
        raise _invalid('only FILE_PURPOSE_BATCH ("batch") files can be uploaded; batch_output files are written by'
                       " batches",
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
    if not is_utf8_text(h.request_id):
        raise _invalid("header.request_id must be UTF-8 text", "INVALID_REQUEST_ID", "header.request_id",
                       "UTF-8 text")
    if h.expires_after is not None and not (MIN_EXPIRES_AFTER <= h.expires_after <= MAX_EXPIRES_AFTER):
        raise _invalid("header.expires_after must be between 1 second and 30 days", "INVALID_EXPIRES_AFTER",
                       "header.expires_after", "1s to 30 days")


def replay_differences(previous: FileRecord, h: UploadHeader, content: tuple[int, str] | None) -> list[str]:
    """What an upload with the request_id of `previous` asks for differently: "filename",
    "expires_after", "content". The content differs when the upload's (size, sha256) -- `content`,
    if it was read -- or the header's expected_bytes / expected_sha256 are not those of `previous`."""
    differs = []
    if h.filename != previous.filename:
        differs.append("filename")
    lifetime = previous.expires_at - previous.created_at if previous.expires_at is not None else None
    if (h.expires_after is None) != (lifetime is None) or (
            lifetime is not None and abs(h.expires_after - lifetime) > 1e-3):  # float seconds since the epoch
        differs.append("expires_after")
    expected = [(h.expected_bytes, h.expected_sha256)] + ([content] if content else [])
    if any((size is not None and size != previous.bytes) or (sha256 and sha256 != previous.sha256)
           for size, sha256 in expected):
        differs.append("content")
    return differs


def request_id_reused(previous: FileRecord, differs: list[str]) -> FailedPrecondition:
    return FailedPrecondition(
        f"request_id {previous.request_id!r} was first used for file {previous.id}; this upload differs in its "
        f"{' and '.join(differs)}. Repeat the first upload to get that file back, or use a new request_id for"
        " a different upload", "REQUEST_ID_REUSED",
        {"file_id": previous.id, "request_id": previous.request_id, "differs": ",".join(differs)})


T = TypeVar("T")


async def idle_bounded(messages: AsyncIterator[T], seconds: float) -> AsyncIterator[T]:
    """`messages` (an upload's messages or chunks, on any API), failing with UPLOAD_IDLE_TIMEOUT
    when the next one takes longer than `seconds`."""
    while True:
        try:
            async with asyncio.timeout(seconds):
                message = await anext(messages)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise upload_idle(seconds) from None
        yield message


def upload_idle(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the upload sent no message for {seconds:g} s and was aborted; nothing was stored",
                            "UPLOAD_IDLE_TIMEOUT", {"idle_timeout_seconds": f"{seconds:g}"})


def validation_error(result: ValidationResult) -> InvalidArgument:
    first = result.problems[0]
    where = f"line {first.line}" if first.line else "file"
    return InvalidArgument(
        f"the batch file has {result.total_problems} problem(s); first at {where}: {first.message}",
        "INVALID_BATCH_FILE",
        {"total_problems": str(result.total_problems), "reported_problems": str(len(result.problems)),
         "first_problem": first.code, "first_line": str(first.line)},
        [FieldViolation(f"line {p.line}" if p.line else "file", f"{p.code}: {p.message}")
         for p in result.problems],
    )


def _callers(principal: Principal, record: FileRecord) -> bool:
    """Whether `principal` sees `record` as one of its files: a shard's result file is the
    service's own until its parent's merge deletes it."""
    return principal.can_see(record.project) and not record.merged_into


class FileManager:
    def __init__(self, store: MetadataStore, blobs: BlobStore, limits: FileLimits, page_tokens: PageTokens,
                 validation_workers: ValidationWorkers | None = None) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self.page_tokens = page_tokens
        # None: every upload is validated on the event loop.
        self.validation_workers = validation_workers
        # Set by the batch layer: which running batch reads this file, if any.
        self.used_by: Callable[[str], str | None] = lambda file_id: None
        self._uploading: Counter[str] = Counter()  # project -> uploads running now
        self.quotas: Quotas | None = None  # set by the batch layer (it needs the ledger and the config)

    # -- upload -----------------------------------------------------------------------

    def validator_args(self) -> dict[str, object]:
        """JsonlValidator's keyword arguments for an upload (they travel to a worker process)."""
        return {"max_lines": self.limits.max_lines, "max_bytes": self.limits.max_bytes}

    def uploads_in_progress(self, project: str | None = None) -> int:
        """Uploads running now, of one project or of all."""
        return self._uploading[project] if project is not None else sum(self._uploading.values())

    @exhausted_when_full
    async def upload(self, principal: Principal, header: UploadHeader, chunks: AsyncIterator[bytes]) -> FileRecord:
        """Stream `chunks` into a new file. `chunks` ends normally only when the client finished
        the upload explicitly; any exception it raises (a cut stream, a protocol error) aborts
        the upload and leaves nothing behind. An API that learns header fields only after the
        content (a multipart form with its fields after the file) sets them on `header` before
        `chunks` ends: the header is checked again then."""
        check_header(header)
        cap = self.limits.max_uploads_per_project
        if self.quotas is not None:
            cap = await self.quotas.upload_cap(principal.project, cap)
        if self._uploading[principal.project] >= cap:
            raise ResourceExhausted(f"project {principal.project!r} already runs {cap} uploads, the most allowed at"
                                    " once; retry when one of them has ended", "TOO_MANY_UPLOADS", retry_after=1.0,
                                    metadata={"project": principal.project, "max_uploads": str(cap),
                                              "limit": str(cap), "current": str(self._uploading[principal.project])})
        self._uploading[principal.project] += 1
        try:
            return await self._upload(principal, header, chunks)
        finally:
            self._uploading[principal.project] -= 1

    async def _upload(self, principal: Principal, header: UploadHeader, chunks: AsyncIterator[bytes]) -> FileRecord:
        if header.request_id:
            previous = await self.store.get_file_by_request_id(principal.project, header.request_id)
            if previous is not None:
                return await self._replay(previous, header, chunks)
        validation = UploadValidation(self.validation_workers, self.validator_args())
        hasher = hashlib.sha256()
        writer = self.blobs.open_writer()
        loop = asyncio.get_running_loop()
        size = 0
        stored: asyncio.Future | None = None
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                self._check_chunk(chunk)
                size += len(chunk)
                if header.expected_bytes is not None and size > header.expected_bytes:
                    raise _invalid(f"received more than the {header.expected_bytes} bytes the header announced",
                                   "SIZE_MISMATCH", "header.expected_bytes", "more bytes arrived")
                # Hashing and writing release the GIL: they run on worker threads (a local
                # writer's) or the network (a remote one's) while the chunk is validated (in a
                # worker process, or on this thread: core/upload_validation.py).
                stored = asyncio.gather(loop.run_in_executor(None, hasher.update, chunk), writer.write(chunk))
                try:
                    await validation.feed(chunk)
                finally:
                    await stored
                    stored = None
                if size > self.limits.max_bytes:
                    raise _invalid(f"the file exceeds the {self.limits.max_bytes}-byte limit", "FILE_TOO_LARGE",
                                   "file", f"at most {self.limits.max_bytes} bytes",
                                   max_bytes=str(self.limits.max_bytes))
            check_header(header)
            if header.expected_bytes is not None and size != header.expected_bytes:
                raise _invalid(f"received {size} bytes, the header announced {header.expected_bytes}",
                               "SIZE_MISMATCH", "header.expected_bytes", f"received {size}")
            digest = hasher.hexdigest()
            if header.expected_sha256 and digest != header.expected_sha256:
                raise _invalid("the content's sha256 does not match header.expected_sha256", "SHA256_MISMATCH",
                               "header.expected_sha256", f"content hashes to {digest}", sha256=digest)
            result = await validation.finish()
            if not result.ok:
                raise validation_error(result)
            if self.quotas is not None:
                await self.quotas.check_stored_bytes(principal.project, size)
            now = time.time()
            record = FileRecord(
                id=new_file_id(), project=principal.project, filename=header.filename,
                purpose=FilePurpose.BATCH, bytes=size, sha256=digest, created_at=now,
                expires_at=now + header.expires_after if header.expires_after else None,
                line_count=result.line_count, endpoint=result.endpoint, model=result.model,
                request_id=header.request_id, groups=result.groups,
            )
        except BaseException:
            # Covers validation errors, a client that hung up (CancelledError) and bugs alike.
            validation.drop()
            if stored is not None:  # the chunk's write, cancelled with us, must end before the abort
                with contextlib.suppress(BaseException):
                    await stored
            await writer.abort()
            raise
        # From here on the upload is complete: blob and record are written together even if
        # the caller goes away now (it can replay with its request_id).
        return await asyncio.shield(self._commit(writer, record, header))

    def _check_chunk(self, chunk: bytes) -> None:
        if len(chunk) > self.limits.max_chunk_bytes:
            raise _invalid(f"a chunk of {len(chunk)} bytes exceeds the {self.limits.max_chunk_bytes}-byte limit",
                           "CHUNK_TOO_LARGE", "chunk", f"at most {self.limits.max_chunk_bytes} bytes")

    async def _replay(self, previous: FileRecord, header: UploadHeader, chunks: AsyncIterator[bytes]) -> FileRecord:
        """`previous` again when this upload is the same one; REQUEST_ID_REUSED otherwise. Without an
        expected_sha256 the content is hashed as it streams (nothing is stored), and only until it
        is known to differ."""
        content = None
        if not header.expected_sha256:
            hasher, size = hashlib.sha256(), 0
            async for chunk in chunks:
                self._check_chunk(chunk)
                size += len(chunk)
                if size > previous.bytes:
                    break
                hasher.update(chunk)  # on the loop: at most 2 MiB, about a millisecond
            content = (size, hasher.hexdigest())
            check_header(header)
        differs = replay_differences(previous, header, content)
        if differs:
            raise request_id_reused(previous, differs)
        return previous

    async def _commit(self, writer: BlobWriter, record: FileRecord, header: UploadHeader) -> FileRecord:
        try:
            await writer.commit(record.id)
        except BaseException:
            await writer.abort()
            raise
        try:
            await (self.quotas.insert_file(record) if self.quotas else self.store.insert_file(record))
        except Duplicate:
            # Two uploads raced with the same request_id: the first one wins.
            await self.blobs.delete(record.id)
            previous = await self.store.get_file_by_request_id(record.project, header.request_id)
            if previous is None:
                raise
            differs = replay_differences(previous, header, (record.bytes, record.sha256))
            if differs:
                raise request_id_reused(previous, differs) from None
            return previous
        except BaseException:
            await self.blobs.delete(record.id)
            raise
        log.info("file %s uploaded: %d bytes, %d lines, project %s", record.id, record.bytes, record.line_count,
                 record.project)
        return record

    # -- reads ------------------------------------------------------------------------

    async def get(self, principal: Principal, file_id: str) -> FileRecord:
        if not file_id:
            raise _invalid("file_id is required", "MISSING_FILE_ID", "file_id", "required")
        record = await self.store.get_file(file_id)
        if record is None or not _callers(principal, record):
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

    async def list_after(self, principal: Principal, limit: int, after_id: str, purpose: FilePurpose | None,
                         oldest_first: bool, weigh: Callable[[FileRecord], int]) -> tuple[list[FileRecord], bool]:
        """Up to `limit` files after the file `after_id` ("": from the start), and whether more follow:
        the HTTP listing, whose cursor is an id."""
        cursor = await after_cursor("file", after_id, self.store.get_file, lambda r: _callers(principal, r))
        return await keyset_rows(
            limit, cursor,
            lambda size, after: self.store.list_files(principal.scope, purpose.value if purpose else None, size,
                                                      after, oldest_first), weigh)

    async def read(self, record: FileRecord, offset: int, limit: int) -> AsyncIterator[bytes]:
        """The bytes of `record` from `offset`, at most `limit` (0: to the end)."""
        if offset < 0 or limit < 0:
            raise _invalid("read_offset and read_limit must not be negative", "INVALID_RANGE",
                           "read_offset" if offset < 0 else "read_limit", "must be >= 0")
        if offset > record.bytes:
            raise _invalid(f"read_offset {offset} is past the end of the file ({record.bytes} bytes)",
                           "INVALID_RANGE", "read_offset", f"at most {record.bytes}")
        async with contextlib.aclosing(self.blobs.read(record.id, offset, limit)) as chunks:
            try:
                first = await anext(chunks, None)
            except KeyError:
                raise FailedPrecondition(f"the bytes of file {record.id} are missing from the blob store",
                                         "FILE_CONTENT_MISSING", {"file_id": record.id}) from None
            if first is None:
                return
            yield first
            async for data in chunks:
                yield data

    @exhausted_when_full
    async def delete(self, principal: Principal, file_id: str) -> None:
        record = await self.get(principal, file_id)
        batch_id = self.used_by(record.id) or await self.store.active_batch_reading(record.id)
        if batch_id is not None:
            raise FailedPrecondition(f"file {record.id} is the input of batch {batch_id}, which is still running;"
                                     " cancel it or wait for it to end", "FILE_IN_USE",
                                     {"file_id": record.id, "batch_id": batch_id})
        await self.store.delete_file(record.id)
        await self.blobs.delete(record.id)

    # -- housekeeping -----------------------------------------------------------------

    async def sweep_expired(self, now: float | None = None) -> int:
        """Expired files, and the shards' result files whose parent has ended: its merge deletes them
        right after its end commits, so these are what a crash in between (or a failed delete) left."""
        async def still_read(record: FileRecord) -> bool:
            # a running batch still reads it: it goes once that batch has ended
            return bool(await self.store.active_batch_reading(record.id))

        async def parent_running(record: FileRecord) -> bool:
            parent = await self.store.get_batch(record.merged_into)
            return parent is not None and not parent.status.is_terminal  # its merge still reads it

        return (await self._remove_unless(await self.store.shard_result_files(), parent_running,
                                          "result file(s) of ended sharded batches")
                + await self._remove_unless(await self.store.expired_files(now or time.time()), still_read,
                                            "expired file(s)"))

    async def _remove_unless(self, records: list[FileRecord], kept: Callable[[FileRecord], Awaitable[bool]],
                             what: str) -> int:
        removed = 0
        for record in records:
            if await kept(record):
                continue
            await self.store.delete_file(record.id)
            await self.blobs.delete(record.id)
            removed += 1
        if removed:
            log.info("deleted %d %s", removed, what)
        return removed

    async def remove_orphan_blobs(self) -> int:
        """Blobs whose record was never written (a crash between commit and insert)."""
        known = await self.store.all_file_ids()
        orphans = [k async for k in self.blobs.keys() if k not in known]
        for key in orphans:
            await self.blobs.delete(key)
        return len(orphans)

    async def run_expiry_sweeps(self, interval: float) -> None:
        while True:
            try:
                await self.sweep_expired()
            except Exception:  # keep sweeping; a failed sweep is retried next time
                log.exception("expiry sweep failed")
            await asyncio.sleep(interval)
