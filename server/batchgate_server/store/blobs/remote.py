"""What the object-storage blob stores (S3, GCS) share: bounded HTTP calls with retries, the
background part uploads that keep memory flat, and the staging names of unfinished blobs.

Every call is bounded: httpx timeouts per connect/read/write, an overall deadline per attempt, and
at most `attempts` tries with jittered exponential backoff on 408/429/5xx and network failures
(honouring Retry-After). What is still failing after that is StorageUnavailable; 507 (MinIO's disk
full) is StorageFull. Nothing of httpx crosses this module: callers get a `Response` whose status
they interpret (404 → KeyError and so on). Headers are never logged: they carry credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx

from batchgate_server.domain.backoff import jittered_delay
from batchgate_server.store.errors import StorageError, StorageFull, StorageUnavailable
from batchgate_server.store.ports import DEFAULT_READ_CHUNK, BlobStore, BlobWriter

log = logging.getLogger(__name__)

# Parts of 8 MiB: S3 needs at least 5 MiB for every part but the last, and GCS resumable chunks
# must be multiples of 256 KiB. Memory per writer: one part filling plus IN_FLIGHT being sent.
PART_SIZE = 8 * 1024 * 1024
SWEEP_INTERVAL = 3600.0  # seconds between two sweeps of stale staging uploads by one store
SWEEP_MAX_PAGES = 10  # listing pages one sweep reads (of each kind), at most
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Unfinished blobs live under <prefix>/STAGING/… where keys() never looks (keys have no "/").
STAGING = ".staging"


@dataclass(frozen=True)
class CallLimits:
    attempts: int = 5
    backoff_base: float = 0.2
    backoff_cap: float = 5.0
    connect_timeout: float = 5.0
    io_timeout: float = 30.0  # one read or write on the socket
    attempt_deadline: float = 120.0  # one whole request (an 8 MiB part on a slow link)


def check_key(key: str) -> str:
    """Keys are opaque ids (`file-…`): no "/" and no leading "." (the same rule as local disk)."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"bad blob key {key!r}")
    return key


def staging_name() -> str:
    """`.staging/<unix seconds>-<uuid>`: the sweep dates a leftover by its name, by our clocks,
    not by the server's (moto dates every multipart upload 2010-11-10)."""
    return f"{STAGING}/{int(time.time())}-{uuid.uuid4().hex}"


def staged_at(name: str) -> float | None:
    """When the staging object `name` was started, from its name; None for a name we did not make."""
    stamp = name.rsplit("/", 1)[-1].split("-", 1)[0]
    return float(stamp) if stamp.isdigit() else None


def join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return min(float(value), 60.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, min(60.0, parsed.timestamp() - time.time()))


Sign = Callable[[str, str, dict[str, str], bytes], Awaitable[dict[str, str]]]


class HttpBackend:
    """One pooled httpx client for one service (`name` appears in errors, never credentials).
    `sign(method, url, headers, body)` returns the headers to send (signed, with a token)."""

    def __init__(self, name: str, sign: Sign, limits: CallLimits = CallLimits(), max_connections: int = 16) -> None:
        self.name = name
        self.limits = limits
        self._sign = sign
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(limits.io_timeout, connect=limits.connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def call(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                   body: bytes = b"", what: str = "") -> httpx.Response:
        """The response (body read) of the first attempt that is not retryable."""
        return await self._attempts(method, url, headers or {}, body, what, stream=False)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                     what: str = "") -> AsyncIterator[httpx.Response]:
        """The response with its body unread (retries cover getting the status line only)."""
        resp = await self._attempts(method, url, headers or {}, b"", what, stream=True)
        try:
            yield resp
        finally:
            await resp.aclose()

    async def _attempts(self, method: str, url: str, headers: dict[str, str], body: bytes, what: str,
                        stream: bool) -> httpx.Response:
        what = what or method
        for attempt in range(self.limits.attempts):
            retry_after = None
            try:
                signed = await self._sign(method, url, {**headers, "Content-Length": str(len(body))}, body)
                async with asyncio.timeout(self.limits.attempt_deadline):
                    request = self.client.build_request(method, url, headers=signed, content=_pieces(body))
                    resp = await self.client.send(request, stream=stream)
                    if resp.status_code not in RETRY_STATUSES:
                        if resp.status_code == 507:
                            await resp.aclose()
                            raise StorageFull(f"{self.name} {what}: the store is full (507)")
                        return resp
                    retry_after = _retry_after(resp)
                    reason = f"HTTP {resp.status_code}"
                    await resp.aclose()
            except (httpx.TransportError, TimeoutError) as err:
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            if attempt + 1 < self.limits.attempts:
                delay = jittered_delay(attempt, self.limits.backoff_base, self.limits.backoff_cap, retry_after)
                log.info("%s %s failed (%s); retry %d in %.2fs", self.name, what, reason, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise StorageUnavailable(f"{self.name} {what}: {reason} after {self.limits.attempts} attempts")


_SEND_PIECE = 256 * 1024


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    """The body in 256 KiB pieces, each sent before the next is handed over: the HTTP stack
    then never holds a copy of a whole part (h11 joins what it frames, the event loop's
    transport buffers what the socket did not take yet)."""
    view = memoryview(body)
    for start in range(0, len(body), _SEND_PIECE):
        yield bytes(view[start:start + _SEND_PIECE])


def unexpected(name: str, what: str, resp: httpx.Response) -> StorageError:
    """A status the caller did not expect (403, 400, …): a misconfiguration, not worth retrying.
    The body is the service's error document (bounded), never our headers."""
    return StorageError(f"{name} {what}: HTTP {resp.status_code}: {resp.text[:300]}")


async def read_resuming(open_range: Callable[[int], contextlib.AbstractAsyncContextManager[httpx.Response | None]],
                        start: int, end: int | None, chunk_size: int, attempts: int,
                        name: str) -> AsyncIterator[bytes]:
    """Stream bytes [start, end) (end None: to the end of the blob). A connection lost mid-body is
    resumed from the byte reached with a new ranged request (the caller pins the object's version
    in `open_range`), at most `attempts` times in a row. `open_range(pos)` yields None when there
    is nothing from `pos` on."""
    pos, failures = start, 0
    while end is None or pos < end:
        try:
            async with open_range(pos) as resp:
                if resp is None:
                    return
                async for piece in resp.aiter_bytes(chunk_size):
                    if end is not None:
                        piece = piece[:end - pos]
                    pos += len(piece)
                    failures = 0
                    yield piece
                    if end is not None and pos >= end:
                        return
            return
        except httpx.TransportError as err:
            failures += 1
            if failures >= attempts:
                raise StorageUnavailable(f"{name} read: {type(err).__name__} at byte {pos}, "
                                         f"{attempts} attempts") from None
            log.info("%s read broke at byte %d (%s); resuming", name, pos, type(err).__name__)


class PartUploads:
    """Cuts the bytes written into parts of exactly `part_size` (the last may be shorter) and sends
    each in a background task, at most `in_flight` at a time: `write` returns once its bytes are
    buffered, so the caller's next chunk is validated while a part is on the wire. Memory: the
    part being filled (the caller's chunks, joined only once a slot is free) plus `in_flight`
    parts. `begin()` runs once before the first part (creating the multipart upload or the
    resumable session), shielded: a cancelled write still learns what it created, so an abort
    can remove it. `send(number, data)` (numbers from 1) raises on failure; that error comes out
    of the next `write` or of `finish`."""

    def __init__(self, begin: Callable[[], Awaitable[None]], send: Callable[[int, bytes], Awaitable[None]],
                 part_size: int = PART_SIZE, in_flight: int = 2) -> None:
        self._begin = begin
        self._begun: asyncio.Task[None] | None = None
        self._send = send
        self.part_size = part_size
        self._in_flight = in_flight
        self._buf: list[bytes] = []
        self._buffered = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.parts = 0  # parts handed to send so far
        self.size = 0  # bytes written so far

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        self._buf.append(bytes(data))  # a bytes object is kept as it is; anything mutable is copied
        self._buffered += len(data)
        while self._buffered >= self.part_size:
            await self._free_slot()
            joined = self.tail()  # one copy (none when the writes add up to a part exactly)
            part, rest = joined[:self.part_size], joined[self.part_size:]
            if rest:
                self._buf, self._buffered = [rest], len(rest)
            await self._submit(part)

    def tail(self) -> bytes:
        """The bytes not yet handed to a part (all of them when no part was cut)."""
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        self._buf, self._buffered = [], 0
        return data

    async def _free_slot(self) -> None:
        while len(self._tasks) >= self._in_flight:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            self._reap()
        self._reap()

    async def _submit(self, part: bytes) -> None:
        await self._free_slot()
        if self._begun is None:
            self._begun = asyncio.ensure_future(self._begin())
        await asyncio.shield(self._begun)
        self.parts += 1
        self._tasks.append(asyncio.create_task(self._send(self.parts, part)))

    def _reap(self) -> None:
        for task in [t for t in self._tasks if t.done()]:
            self._tasks.remove(task)
            task.result()  # raises the part's error

    async def finish(self, last: bytes) -> None:
        """Send `last` (if any) as the final part and wait for every part."""
        if last:
            await self._submit(last)
        while self._tasks:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            self._reap()

    async def cancel(self) -> None:
        """Stop the parts in flight; wait for a `begin` in flight to end (its upload is then known
        and can be aborted)."""
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *([self._begun] if self._begun else [])]:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self._buf, self._buffered = [], 0


class RemoteBlobWriter(BlobWriter):
    """What the S3 and GCS writers share: the staging name, the part pipeline (`in_flight` parts
    at a time), and the commit/abort bookkeeping. Subclasses say how to begin the staging upload,
    send a part, commit (`_commit(name)`: everything to the object `name`, returning the size)
    and discard what was staged (`_discard`)."""

    def __init__(self, store: RemoteBlobStore, in_flight: int) -> None:
        self._store = store
        self._staging = join(store.prefix, staging_name())
        self._done = False
        self._parts = PartUploads(self._begin, self._send_part, store.part_size, in_flight)

    async def _begin(self) -> None:
        raise NotImplementedError

    async def _send_part(self, number: int, data: bytes) -> None:
        raise NotImplementedError

    async def _commit(self, name: str) -> int:
        raise NotImplementedError

    async def _discard(self) -> None:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        if self._done:
            raise StorageError("write after commit or abort")
        try:
            await self._parts.write(data)
        except BaseException:
            await self.abort()
            raise

    async def commit(self, key: str) -> int:
        name = self._store.name_of(key)
        if self._done:
            raise StorageError("commit after commit or abort")
        try:
            size = await self._commit(name)
        except BaseException:
            await self.abort()
            raise
        self._done = True
        return size

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        await self._parts.cancel()
        try:
            await self._discard()
        except StorageError as err:  # the sweep removes it later
            log.warning("%s: could not discard the staging upload %s: %s", self._store.service, self._staging, err)


class RemoteBlobStore(BlobStore):
    """What the S3 and GCS stores share: keys under a prefix, and the background sweep of what
    crashed writers left in staging (`sweep_stale_uploads`, at most every SWEEP_INTERVAL, started
    when a writer is opened)."""

    service = ""

    def __init__(self, prefix: str, limits: CallLimits, part_size: int, stale_after: float) -> None:
        self.prefix = prefix.strip("/")
        self.limits = limits
        self.part_size = part_size
        self.stale_after = stale_after
        self._sweep: asyncio.Task[int] | None = None
        self._next_sweep = 0.0
        self.http: HttpBackend  # set by the subclass

    def name_of(self, key: str) -> str:
        return join(self.prefix, check_key(key))

    @property
    def key_prefix(self) -> str:
        """What every object name of a key starts with."""
        return f"{self.prefix}/" if self.prefix else ""

    @property
    def staging_prefix(self) -> str:
        return join(self.prefix, STAGING) + "/"

    def _writer(self) -> RemoteBlobWriter:
        raise NotImplementedError

    def open_writer(self) -> RemoteBlobWriter:
        self._maybe_sweep()
        return self._writer()

    async def sweep_stale_uploads(self, older_than: float | None = None) -> int:
        raise NotImplementedError

    def _cutoff(self, older_than: float | None) -> float:
        return time.time() - (self.stale_after if older_than is None else older_than)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or (self._sweep is not None and not self._sweep.done()):
            return
        self._next_sweep = now + SWEEP_INTERVAL
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_logged())

    async def _sweep_logged(self) -> int:
        try:
            removed = await self.sweep_stale_uploads()
        except StorageError as err:
            log.warning("%s: sweeping stale staging uploads failed (next try in an hour): %s", self.service, err)
            return 0
        if removed:
            log.info("%s: removed %d stale staging uploads under %s", self.service, removed, self.staging_prefix)
        return removed

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            with contextlib.suppress(BaseException):
                await self._sweep
        await self.http.aclose()

    # -- reads --------------------------------------------------------------------------------

    def _ranged_get(self, name: str, version: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """URL and headers of a GET of `name` (its `Range` in headers), pinned to `version` if set."""
        raise NotImplementedError

    def _version(self, resp: httpx.Response) -> str:
        """What pins the object a GET answered (ETag, generation), for the resumed requests."""
        raise NotImplementedError

    async def read(self, key: str, offset: int = 0, limit: int = 0,
                   chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncIterator[bytes]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        name = self.name_of(key)
        end = offset + limit if limit else None
        version = ""

        @contextlib.asynccontextmanager
        async def open_range(pos: int) -> AsyncIterator[httpx.Response | None]:
            nonlocal version
            ranged = {"Range": f"bytes={pos}-{end - 1 if end is not None else ''}"} if pos or end is not None else {}
            url, headers = self._ranged_get(name, version, ranged)
            async with self.http.stream("GET", url, headers=headers, what="read") as resp:
                if resp.status_code == 416:  # from beyond the end: nothing
                    yield None
                    return
                if resp.status_code in (404, 412):  # 412: the pinned version is gone
                    if version:
                        raise StorageUnavailable(f"{self.service} read: {key} was replaced or deleted while being read")
                    raise KeyError(key)
                if resp.status_code not in (200, 206):
                    await resp.aread()
                    raise unexpected(self.service, "read", resp)
                version = self._version(resp)
                yield resp

        async for piece in read_resuming(open_range, offset, end, chunk_size, self.limits.attempts, self.service):
            yield piece
