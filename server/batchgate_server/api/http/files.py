"""/v1/files over core.files.FileManager: the multipart upload streamed into FileManager.upload as it
arrives, listings paged by id, downloads with Range."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from urllib.parse import quote

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from batchgate_server.api.http.errors import json_response
from batchgate_server.api.http.objects import file_deleted, file_object, list_object
from batchgate_server.api.http.params import authenticate, invalid, query_choice, query_limit, whole_number
from batchgate_server.core.auth import Authenticator
from batchgate_server.core.errors import echo
from batchgate_server.core.files import FileManager, UploadHeader, idle_bounded, upload_idle
from batchgate_server.domain.models import FilePurpose

PURPOSES = {p.value: p for p in FilePurpose}
# What aiohttp's multipart reader raises for a broken body (a bad boundary, a header it refuses).
_MALFORMED = (ValueError, HttpProcessingError)
# Content goes to FileManager in pieces of this size (or its chunk limit, if smaller): the multipart
# reader hands out what the socket had (often 64 KiB or less), and every piece costs FileManager a
# hop to a thread.
CONTENT_PIECE_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 1024  # purpose, expires_after[…]: a few characters
MAX_FIELDS = 16  # form fields before the file part
MAX_FILES_LIMIT = 10_000  # OpenAI's bounds for GET /v1/files
_RANGE = re.compile(r"bytes=([0-9]{0,20})-([0-9]{0,20})")  # ASCII digits only: \d takes "²"


def _malformed(err: Exception) -> Exception:
    return invalid(f"the multipart body is malformed: {err}", "MALFORMED_MULTIPART", "body",
                   "multipart/form-data with a file part")


async def _field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES + 1):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise invalid(f"form field {echo(part.name or '')} is longer than {MAX_FIELD_BYTES} bytes",
                          "FIELD_TOO_LONG", part.name or "body", f"at most {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise invalid(f"form field {echo(part.name or '')} is not UTF-8", "INVALID_FIELD", part.name or "body",
                      "UTF-8 text") from None


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except _MALFORMED as err:
        raise _malformed(err) from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise invalid("nested multipart bodies are not accepted", "MALFORMED_MULTIPART", "body",
                      "flat multipart/form-data")
    return part


async def _read_fields(reader: MultipartReader, fields: dict[str, str]) -> BodyPartReader | None:
    """Adds the form fields up to the next file part to `fields`; returns that part (its content
    unread), or None at the end of the body."""
    while (part := await _next_part(reader)) is not None:
        if part.name == "file":
            return part
        if len(fields) >= MAX_FIELDS:
            raise invalid(f"more than {MAX_FIELDS} form fields", "TOO_MANY_FIELDS", "body",
                          f"at most {MAX_FIELDS} fields")
        fields[part.name or ""] = await _field(part)
    return None


def _expires_after(fields: dict[str, str]) -> float | None:
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid('expires_after[anchor] must be "created_at"', "INVALID_EXPIRES_AFTER",
                      "expires_after[anchor]", '"created_at"')
    value = whole_number(seconds or "")
    if value is None:
        raise invalid("expires_after[seconds] must be a whole number of seconds", "INVALID_EXPIRES_AFTER",
                      "expires_after[seconds]", "an integer")
    return float(value)


def _apply_fields(header: UploadHeader, fields: dict[str, str], final: bool) -> None:
    """The form fields onto `header`. Until the body has ended (`final` False) a purpose not sent yet
    is taken to be batch: clients send the fields before the file (curl -F in order, the Python SDK)
    or after it (the node SDK), and the content streams in before the latter arrive."""
    purpose = fields.get("purpose")
    header.purpose = PURPOSES.get(purpose) if purpose is not None else (None if final else FilePurpose.BATCH)
    header.expires_after = _expires_after(fields)


async def _content(reader: MultipartReader, part: BodyPartReader, header: UploadHeader, fields: dict[str, str],
                   piece_bytes: int) -> AsyncIterator[bytes]:
    """The file part's bytes in pieces of `piece_bytes`, then the fields after it set on `header`
    (FileManager checks it again). Ends normally only once the multipart body has ended properly
    (its closing boundary) right after: a body cut short (the client went away, a boundary
    missing) raises, and FileManager stores nothing."""
    buffered = bytearray()
    try:
        while chunk := await part.read_chunk(piece_bytes):
            buffered += chunk
            while len(buffered) >= piece_bytes:
                yield bytes(buffered[:piece_bytes])
                del buffered[:piece_bytes]
    except _MALFORMED as err:
        raise _malformed(err) from None
    if buffered:
        yield bytes(buffered)
    if await _read_fields(reader, fields) is not None:
        raise invalid("the multipart body has a second file part; upload one file per request", "MULTIPLE_FILES",
                      "file", "one file part")
    _apply_fields(header, fields, final=True)


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, end) of a single `Range: bytes=…` (end exclusive); None for no usable Range (the
    whole file, as RFC 9110 asks for a Range it does not understand). Raises HTTPRequestRangeNotSatisfiable."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    if start >= end:  # past the end, or last before first
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


class FileRoutes:
    def __init__(self, auth: Authenticator, files: FileManager) -> None:
        self.auth = auth
        self.files = files

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self.create)
        router.add_get("/v1/files", self.list)
        router.add_get("/v1/files/{file_id}", self.retrieve)
        router.add_delete("/v1/files/{file_id}", self.delete)
        router.add_get("/v1/files/{file_id}/content", self.content)

    async def create(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        if request.content_type != "multipart/form-data":
            raise invalid(f"POST /v1/files takes multipart/form-data, not {echo(request.content_type)}",
                          "INVALID_CONTENT_TYPE", "body", "multipart/form-data")
        try:
            reader = await request.multipart()
        except KeyError:
            raise _malformed(ValueError("the Content-Type names no boundary")) from None
        except ValueError as err:  # a boundary over 70 characters
            raise _malformed(err) from None
        fields: dict[str, str] = {}
        idle = self.files.limits.upload_idle_timeout
        try:
            async with asyncio.timeout(idle):  # the fields before the file are a few bytes
                part = await _read_fields(reader, fields)
        except TimeoutError:
            raise upload_idle(idle) from None
        if part is None:
            raise invalid("the multipart body has no file part", "MISSING_FILE", "file", "required")
        header = UploadHeader(filename=part.filename or "", purpose=None,
                              request_id=request.headers.get("Idempotency-Key", ""))
        _apply_fields(header, fields, final=False)
        pieces = _content(reader, part, header, fields, min(CONTENT_PIECE_BYTES, self.files.limits.max_chunk_bytes))
        record = await self.files.upload(principal, header, idle_bounded(pieces, idle))
        return json_response(file_object(record))

    async def list(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        limit = query_limit(request, MAX_FILES_LIMIT, MAX_FILES_LIMIT)
        order = query_choice(request, "order", ("asc", "desc"), "desc")
        purpose = query_choice(request, "purpose", tuple(PURPOSES), None)
        rows, more = await self.files.list_after(principal, limit, request.query.get("after", ""),
                                                 PURPOSES.get(purpose or ""), order == "asc",
                                                 weigh=lambda f: len(json.dumps(file_object(f))))
        return json_response(list_object([file_object(f) for f in rows], more))

    async def retrieve(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        return json_response(file_object(await self.files.get(principal, request.match_info["file_id"])))

    async def delete(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        file_id = request.match_info["file_id"]
        await self.files.delete(principal, file_id)
        return json_response(file_deleted(file_id))

    async def content(self, request: web.Request) -> web.StreamResponse:
        principal = await authenticate(self.auth, request)
        record = await self.files.get(principal, request.match_info["file_id"])
        span = _byte_range(request.headers.get("Range", ""), record.bytes) if "Range" in request.headers else None
        start, end = span or (0, record.bytes)
        filename = quote(record.filename.encode("utf-8", "replace"), safe="")
        response = web.StreamResponse(status=206 if span else 200, headers={
            "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
            "Content-Disposition": f"attachment; filename*=UTF-8''{filename}"})
        if span:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.bytes}"
        response.content_length = end - start
        async with contextlib.aclosing(self.files.read(record, start, end - start)) as chunks:
            first = await anext(chunks, b"")  # FILE_CONTENT_MISSING, as a JSON error, before anything is sent
            await response.prepare(request)
            await response.write(first)
            async for data in chunks:
                await response.write(data)
        await response.write_eof()
        return response
