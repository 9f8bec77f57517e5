"""The one implementation of the client, shared by BatchgateClient and AsyncBatchgateClient.

Every operation is a generator of steps: it yields what it needs done (a call, a read from a
stream, a pause, blocking work, an item for the caller) and is sent back the result, or thrown
the typed error. The generator holds all the logic — requests, pagination, retries with backoff,
watch and download reconnection, verification, the batch helpers — and does no I/O itself. A
runner performs the steps: `client.py` with the blocking stubs and time.sleep, `aio.py` with the
grpc.aio stubs and asyncio.sleep; each runner is a dozen lines.

Why not the sync client over the async one on a private event-loop thread: every call and every
streamed message would cross threads, and each client would carry a hidden thread and event loop
(in the way at fork and at interpreter exit). A generator step costs about 2 µs against a call's
hundreds, and both clients measure within noise of the bare stubs (bench/client_overhead.py).
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc

from batchgate._common import (
    DEFAULT_CHUNK,
    DownloadTarget,
    TimeLike,
    file_sha256,
    read_chunks,
    upload_header,
    upload_messages,
    usage_request,
)
from batchgate.errors import BatchgateError, UnavailableError
from batchgate.types import TERMINAL, Batch, File, wrap
from batchgate.v1 import batch_pb2, file_pb2, usage_pb2

T = TypeVar("T")


# -- the steps an operation yields ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Call:
    """A unary or client-streaming call: `request` is a message, or an iterator of them."""

    service: str  # "files", "batches" or "usage": the client's stub attributes
    method: str
    request: Any
    timeout: float | None


@dataclasses.dataclass(frozen=True)
class Open:
    """Start a server-streaming call; the runner sends back the stream (and cancels it when the
    operation ends, however it ends)."""

    service: str
    method: str
    request: Any


@dataclasses.dataclass(frozen=True)
class Read:
    """The next message of an open stream, None at its end."""

    stream: Any


@dataclasses.dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Blocking:
    """Work that blocks (hashing a file): run inline, or on a worker thread by the asyncio runner."""

    fn: Callable[..., Any]
    args: tuple


@dataclasses.dataclass(frozen=True)
class Emit:
    """An item for the caller of an iterating operation (list_*, watch, iter_file)."""

    value: Any


Steps = Generator[Any, Any, T]


class Stepper:
    """Advances an operation: `op` is its pending step (None once it returned `result`)."""

    def __init__(self, steps: Steps) -> None:
        self._steps = steps
        self.op: Any = None
        self.result: Any = None
        self.streams: list[Any] = []
        self._advance(self._steps.send, None)

    def _advance(self, fn, arg) -> None:
        try:
            self.op = fn(arg)
        except StopIteration as stop:
            self.op, self.result = None, stop.value

    def resolve(self, value: Any) -> None:
        if isinstance(self.op, Open):
            self.streams.append(value)
        self._advance(self._steps.send, value)

    def fail(self, err: BaseException) -> None:
        self._advance(self._steps.throw, err)

    def close(self) -> None:
        """End the operation: the generator is closed and its streams cancelled."""
        self._steps.close()
        for stream in self.streams:
            stream.cancel()


def relay(sub: Steps, on_emit: Callable[[Any], None]) -> Steps:
    """Run the operation `sub` inside another: its items go to `on_emit`, its other steps out to the
    runner (and their results and errors back into it). Returns what `sub` returns."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = sub.throw(error) if error is not None else sub.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if isinstance(op, Emit):
            on_emit(op.value)
            continue
        try:
            value = yield op
        except GeneratorExit:
            sub.close()
            raise
        except BaseException as err:  # noqa: BLE001 - handed to `sub`, which re-raises what it does not handle
            error = err


# -- retries -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that failed UNAVAILABLE (the server restarting, a connection dropped):
    up to `attempts` tries in all, `initial_backoff` seconds before the second, growing by
    `multiplier` up to `max_backoff`, each with jitter (a random part, so that many clients do not
    come back at once); never sooner than a RetryInfo the server sent. Only idempotent calls are
    retried: reads, and creates and uploads that carry a request_id (the clients add one)."""

    attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, retry: int, err: BatchgateError | None = None) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if err is not None and err.retry_delay is not None:
            delay = max(delay, err.retry_delay.total_seconds())
        return delay


NO_RETRIES = RetryPolicy(attempts=1)

# A watch that loses its stream reconnects on these (the server restarting, a proxy timing out).
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})


@dataclasses.dataclass(frozen=True)
class Options:
    """What every operation needs from its client."""

    timeout: float | None = 60.0
    retry: RetryPolicy = RetryPolicy()


DEFAULT_TIMEOUT = object()  # `call`: the client's timeout (None is "no deadline")


def new_request_id() -> str:
    return f"bg-{uuid.uuid4()}"


def call(options: Options, service: str, method: str, request: Any, *, idempotent: bool = True,
         replay: Callable[[], Any] | None = None, timeout: Any = DEFAULT_TIMEOUT) -> Steps[Any]:
    """One call with retries on UNAVAILABLE when `idempotent`. `replay` makes the request of each
    attempt (a client stream cannot be sent twice); otherwise `request` is sent every time."""
    attempt = 1
    while True:
        try:
            return (yield Call(service, method, replay() if replay else request,
                               options.timeout if timeout is DEFAULT_TIMEOUT else timeout))
        except UnavailableError as err:
            if not idempotent or attempt >= options.retry.attempts:
                raise
            yield Sleep(options.retry.backoff(attempt, err))
            attempt += 1


def paged(options: Options, service: str, method: str, request: Any, items: str) -> Steps[None]:
    """Every item of every page, following next_page_token."""
    while True:
        page = yield from call(options, service, method, request)
        for item in getattr(page, items):
            yield Emit(wrap(item))
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


# -- files ---------------------------------------------------------------------------------------

def _path_chunks(path: str | os.PathLike, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from read_chunks(fh, chunk_size)


def upload_file(options: Options, source: str | os.PathLike | BinaryIO | bytes, *, filename: str | None,
                purpose: int, request_id: str, expires_after_seconds: int | None, chunk_size: int) -> Steps[File]:
    """From a path the size and sha256 go in the header for the server to verify. Without a
    request_id one is made up, so that a retried upload returns the file of the first attempt
    instead of storing it twice; a source that cannot be read again (a pipe) is not retried."""
    request_id = request_id or new_request_id()
    header_fields = dict(purpose=purpose, request_id=request_id, expires_after_seconds=expires_after_seconds)
    if isinstance(source, (str, os.PathLike)):
        size, digest = yield Blocking(file_sha256, (source,))
        header = upload_header(filename or Path(source).name, size=size, sha256=digest, **header_fields)

        def chunks() -> Iterator[bytes]:
            return _path_chunks(source, chunk_size)
        replayable = True
    else:
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        name = getattr(stream, "name", None)  # an open file's is its path: the file name is its last part
        header = upload_header(filename or (Path(name).name if isinstance(name, str) else "upload.jsonl"),
                               size=None, sha256="", **header_fields)
        replayable = stream.seekable()
        start = stream.tell() if replayable else 0

        def chunks() -> Iterator[bytes]:
            if replayable:
                stream.seek(start)
            return read_chunks(stream, chunk_size)
    response = yield from call(options, "files", "UploadFile", None, idempotent=replayable,
                               replay=lambda: upload_messages(header, chunks()), timeout=None)
    return File(response.file)


def get_file(options: Options, file_id: str) -> Steps[File]:
    return File((yield from call(options, "files", "GetFile", file_pb2.GetFileRequest(file_id=file_id))).file)


def list_files(options: Options, *, purpose: int, page_size: int) -> Steps[None]:
    return paged(options, "files", "ListFiles", file_pb2.ListFilesRequest(page_size=page_size, purpose=purpose),
                 "files")


def iter_file(options: Options, file_id: str, *, offset: int = 0, limit: int = 0) -> Steps[None]:
    """The file's bytes from `offset` (`limit` bytes, 0 = to the end). A stream that drops is
    opened again after the last byte received."""
    failures = 0
    while True:
        request = file_pb2.DownloadFileRequest(file_id=file_id, read_offset=offset, read_limit=limit)
        stream = yield Open("files", "DownloadFile", request)
        try:
            while (message := (yield Read(stream))) is not None:
                if message.data:
                    failures = 0
                    offset += len(message.data)
                    if limit:
                        limit -= len(message.data)
                    yield Emit(message.data)
            return
        except UnavailableError as err:
            if request.read_limit and limit <= 0:
                return  # every byte asked for had come
            failures += 1
            if failures >= options.retry.attempts:
                raise
            yield Sleep(options.retry.backoff(failures, err))


def download_file(options: Options, file_id: str, path: str | os.PathLike, *, resume: bool) -> Steps[int]:
    record = yield from get_file(options, file_id)
    with DownloadTarget(path, record.message, resume=resume) as target:
        yield from relay(iter_file(options, file_id, offset=target.offset), target.write)
    return target.written


def read_file(options: Options, file_id: str) -> Steps[bytes]:
    data = bytearray()
    yield from relay(iter_file(options, file_id), data.extend)
    return bytes(data)


def delete_file(options: Options, file_id: str) -> Steps[bool]:
    return (yield from call(options, "files", "DeleteFile", file_pb2.DeleteFileRequest(file_id=file_id))).deleted


# -- batches -------------------------------------------------------------------------------------

def create_batch(options: Options, input_file_id: str, endpoint: str, *, completion_window: str,
                 metadata: dict[str, str] | None, model: str, provider: str, request_id: str,
                 model_map: dict[str, str] | None = None, spread: bool = False) -> Steps[Batch]:
    """Without a request_id one is made up, so that a retried create never creates twice."""
    request = batch_pb2.CreateBatchRequest(
        input_file_id=input_file_id, endpoint=endpoint, completion_window=completion_window,
        metadata=metadata or {}, model=model, provider=provider, request_id=request_id or new_request_id(),
        model_map=model_map or {}, spread=spread)
    return Batch((yield from call(options, "batches", "CreateBatch", request)).batch)


def get_batch(options: Options, batch_id: str) -> Steps[Batch]:
    return Batch((yield from call(options, "batches", "GetBatch", batch_pb2.GetBatchRequest(batch_id=batch_id))).batch)


def list_batches(options: Options, *, statuses: Iterable[int], page_size: int) -> Steps[None]:
    return paged(options, "batches", "ListBatches",
                 batch_pb2.ListBatchesRequest(page_size=page_size, statuses=list(statuses)), "batches")


def cancel_batch(options: Options, batch_id: str) -> Steps[Batch]:
    request = batch_pb2.CancelBatchRequest(batch_id=batch_id)
    return Batch((yield from call(options, "batches", "CancelBatch", request)).batch)


def watch(options: Options, batch_id: str, *, start_revision: int = 0, reconnect_delay: float = 0.5,
          max_reconnects: int = 20) -> Steps[None]:
    """Every state of the batch until it ends; a dropped stream is opened again after the last
    revision seen, so no state comes twice."""
    revision = start_revision
    failures = 0
    while True:
        stream = yield Open("batches", "WatchBatch",
                            batch_pb2.WatchBatchRequest(batch_id=batch_id, start_revision=revision))
        try:
            while (event := (yield Read(stream))) is not None:
                if event.WhichOneof("event") != "batch":
                    continue
                failures = 0
                revision = event.batch.revision
                state = Batch(event.batch)
                yield Emit(state)
                if state.status in TERMINAL:
                    return
            return
        except BatchgateError as err:
            if err.code() not in RECONNECT_CODES or failures >= max_reconnects:
                raise
            failures += 1
            yield Sleep(reconnect_delay * min(failures, 10))


def wait(options: Options, batch_id: str) -> Steps[Batch]:
    """The final state of the batch, once it has ended."""
    last: list[Batch] = []

    def keep(state: Batch) -> None:
        last[:] = [state]
    yield from relay(watch(options, batch_id), keep)
    return last[0] if last else (yield from get_batch(options, batch_id))


# -- usage ---------------------------------------------------------------------------------------

def query_usage(options: Options, *, start_time: TimeLike, end_time: TimeLike, group_by: Iterable[int],
                metadata_key: str, project: str, model: str, provider: str,
                page_size: int) -> Steps[usage_pb2.QueryUsageResponse]:
    request = usage_request(start_time=start_time, end_time=end_time, group_by=group_by, metadata_key=metadata_key,
                            project=project, model=model, provider=provider, page_size=page_size)
    result = usage_pb2.QueryUsageResponse()
    while True:
        page = yield from call(options, "usage", "QueryUsage", request)
        result.rows.extend(page.rows)
        result.totals.CopyFrom(page.totals)
        if not page.next_page_token:
            return result
        request.page_token = page.next_page_token


__all__ = ["DEFAULT_CHUNK", "Options", "RetryPolicy", "NO_RETRIES", "Stepper"]
