"""Pieces shared by the sync and asyncio clients."""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from google.protobuf import duration_pb2, timestamp_pb2

from batchgate.v1 import batch_pb2, file_pb2, usage_pb2

DEFAULT_CHUNK = 256 * 1024
TERMINAL_STATUSES = frozenset({
    batch_pb2.BATCH_STATUS_COMPLETED, batch_pb2.BATCH_STATUS_FAILED,
    batch_pb2.BATCH_STATUS_EXPIRED, batch_pb2.BATCH_STATUS_CANCELLED,
})
# Large uploads/downloads stream 2 MiB messages at most.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 4 * 1024 * 1024),
                   ("grpc.max_send_message_length", 4 * 1024 * 1024)]


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def file_sha256(path: str | os.PathLike) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while data := fh.read(1024 * 1024):
            h.update(data)
            size += len(data)
    return size, h.hexdigest()


def upload_header(filename: str, *, purpose: int, size: int | None, sha256: str, request_id: str,
                  expires_after_seconds: int | None) -> file_pb2.UploadFileRequest:
    header = file_pb2.UploadFileHeader(filename=filename, purpose=purpose, expected_sha256=sha256,
                                       request_id=request_id)
    if size is not None:
        header.expected_bytes = size
    if expires_after_seconds:
        header.expires_after.CopyFrom(duration_pb2.Duration(seconds=expires_after_seconds))
    return file_pb2.UploadFileRequest(header=header)


def read_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while data := stream.read(chunk_size):
        yield data


def upload_messages(header: file_pb2.UploadFileRequest, chunks: Iterable[bytes]) -> Iterator[file_pb2.UploadFileRequest]:
    """The header, the chunks, then the finish message: the server commits the file only after it,
    so an upload cut short (an exception while reading `chunks`, a cancelled call) stores nothing."""
    yield header
    for chunk in chunks:
        yield file_pb2.UploadFileRequest(chunk=chunk)
    yield file_pb2.UploadFileRequest(finish=file_pb2.UploadFileFinish())


TimeLike = datetime.datetime | float | int | timestamp_pb2.Timestamp | None


def to_timestamp(value: TimeLike) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from a datetime (naive means UTC), unix seconds, or a Timestamp; None stays None."""
    if value is None or isinstance(value, timestamp_pb2.Timestamp):
        return value
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(round(value * 1e9)))
    return ts


def usage_request(*, start_time: TimeLike, end_time: TimeLike, group_by: Iterable[int], metadata_key: str,
                  project: str, model: str, provider: str, page_size: int) -> usage_pb2.QueryUsageRequest:
    return usage_pb2.QueryUsageRequest(start_time=to_timestamp(start_time), end_time=to_timestamp(end_time),
                                       group_by=list(group_by), metadata_key=metadata_key, project=project,
                                       model=model, provider=provider, page_size=page_size)
