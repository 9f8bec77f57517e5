"""Synchronous client.

    from batchgate import BatchgateClient
    with BatchgateClient("localhost:50051", api_key="bg-…") as bg:
        f = bg.upload_file("requests.jsonl")
        batch = bg.create_batch(f.id, "/v1/chat/completions")
        for state in bg.watch(batch.id):
            print(state.status, state.request_counts)
        bg.download_file(state.output_file_id, "results.jsonl")
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import grpc

from batchgate._common import (
    CHANNEL_OPTIONS,
    DEFAULT_CHUNK,
    TERMINAL_STATUSES,
    DownloadTarget,
    TimeLike,
    auth_metadata,
    file_sha256,
    read_chunks,
    upload_header,
    upload_messages,
    usage_request,
)
from batchgate.v1 import batch_pb2, batch_pb2_grpc, file_pb2, file_pb2_grpc, usage_pb2, usage_pb2_grpc

__all__ = ["BatchgateClient", "TERMINAL_STATUSES"]

# A watch that loses its stream reconnects on these (the server restarting, a proxy timing out).
_RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})


class BatchgateClient:
    def __init__(self, target: str, api_key: str | None = None, *, channel: grpc.Channel | None = None,
                 timeout: float | None = 60.0) -> None:
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.files = file_pb2_grpc.FileServiceStub(self.channel)
        self.batches = batch_pb2_grpc.BatchServiceStub(self.channel)
        self.usage = usage_pb2_grpc.UsageServiceStub(self.channel)
        self._md = auth_metadata(api_key)
        self.timeout = timeout

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "BatchgateClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ----------------------------------------------------------------------

    def upload_file(self, source: str | os.PathLike | BinaryIO | bytes, *, filename: str | None = None,
                    purpose: int = file_pb2.FILE_PURPOSE_BATCH, request_id: str = "",
                    expires_after_seconds: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> file_pb2.File:
        """Upload from a path (size and sha256 sent for the server to verify), bytes, or a binary stream."""
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        if isinstance(source, (str, os.PathLike)):
            size, digest = file_sha256(source)
            header = upload_header(filename or Path(source).name, purpose=purpose, size=size, sha256=digest,
                                   request_id=request_id, expires_after_seconds=expires_after_seconds)
            with open(source, "rb") as fh:
                return self._upload(upload_messages(header, read_chunks(fh, chunk_size)))
        header = upload_header(filename or getattr(source, "name", "upload.jsonl"), purpose=purpose, size=None,
                               sha256="", request_id=request_id, expires_after_seconds=expires_after_seconds)
        return self._upload(upload_messages(header, read_chunks(source, chunk_size)))

    def _upload(self, messages: Iterable[file_pb2.UploadFileRequest]) -> file_pb2.File:
        return self.files.UploadFile(messages, metadata=self._md).file

    def get_file(self, file_id: str) -> file_pb2.File:
        return self.files.GetFile(file_pb2.GetFileRequest(file_id=file_id), metadata=self._md,
                                  timeout=self.timeout).file

    def list_files(self, *, purpose: int = 0, page_size: int = 100) -> Iterator[file_pb2.File]:
        """Every file, following page tokens."""
        token = ""
        while True:
            page = self.files.ListFiles(file_pb2.ListFilesRequest(page_size=page_size, page_token=token,
                                                                  purpose=purpose),
                                        metadata=self._md, timeout=self.timeout)
            yield from page.files
            token = page.next_page_token
            if not token:
                return

    def iter_file(self, file_id: str, *, offset: int = 0, limit: int = 0) -> Iterator[bytes]:
        for message in self.files.DownloadFile(
                file_pb2.DownloadFileRequest(file_id=file_id, read_offset=offset, read_limit=limit),
                metadata=self._md):
            if message.data:
                yield message.data

    def download_file(self, file_id: str, path: str | os.PathLike, *, resume: bool = False) -> int:
        """Download to `path`, replacing it only once size and sha256 match the file record
        (DownloadVerificationError otherwise; `path` stays as it was). With `resume`, an interrupted
        download kept in `<path>.part` is continued. Returns the bytes received."""
        with DownloadTarget(path, self.get_file(file_id), resume=resume) as target:
            for data in self.iter_file(file_id, offset=target.offset):
                target.write(data)
        return target.written

    def delete_file(self, file_id: str) -> bool:
        return self.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=file_id), metadata=self._md,
                                     timeout=self.timeout).deleted

    # -- batches --------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, *, completion_window: str = "24h",
                     metadata: dict[str, str] | None = None, model: str = "", provider: str = "",
                     request_id: str = "") -> batch_pb2.Batch:
        return self.batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=input_file_id, endpoint=endpoint, completion_window=completion_window,
            metadata=metadata or {}, model=model, provider=provider, request_id=request_id),
            metadata=self._md, timeout=self.timeout).batch

    def get_batch(self, batch_id: str) -> batch_pb2.Batch:
        return self.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=self._md,
                                     timeout=self.timeout).batch

    def list_batches(self, *, statuses: Iterable[int] = (), page_size: int = 100) -> Iterator[batch_pb2.Batch]:
        token = ""
        while True:
            page = self.batches.ListBatches(batch_pb2.ListBatchesRequest(
                page_size=page_size, page_token=token, statuses=list(statuses)),
                metadata=self._md, timeout=self.timeout)
            yield from page.batches
            token = page.next_page_token
            if not token:
                return

    def cancel_batch(self, batch_id: str) -> batch_pb2.Batch:
        return self.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch_id), metadata=self._md,
                                        timeout=self.timeout).batch

    def watch(self, batch_id: str, *, start_revision: int = 0, reconnect_delay: float = 0.5,
              max_reconnects: int = 20) -> Iterator[batch_pb2.Batch]:
        """Every state of the batch until it ends, reconnecting from the last revision seen."""
        revision = start_revision
        failures = 0
        while True:
            try:
                for event in self.batches.WatchBatch(
                        batch_pb2.WatchBatchRequest(batch_id=batch_id, start_revision=revision),
                        metadata=self._md):
                    if event.WhichOneof("event") != "batch":
                        continue
                    failures = 0
                    revision = event.batch.revision
                    yield event.batch
                    if event.batch.status in TERMINAL_STATUSES:
                        return
                return
            except grpc.RpcError as err:
                if err.code() not in _RECONNECT_CODES or failures >= max_reconnects:
                    raise
                failures += 1
                time.sleep(reconnect_delay * min(failures, 10))

    def wait(self, batch_id: str) -> batch_pb2.Batch:
        """Block until the batch ends; returns its final state."""
        last = None
        for last in self.watch(batch_id):
            pass
        return last if last is not None else self.get_batch(batch_id)

    # -- usage ----------------------------------------------------------------------

    def query_usage(self, *, start_time: TimeLike = None, end_time: TimeLike = None, group_by: Iterable[int] = (),
                    metadata_key: str = "", project: str = "", model: str = "", provider: str = "",
                    page_size: int = 1000) -> usage_pb2.QueryUsageResponse:
        """Usage and cost of the batches that ended in [start_time, end_time), grouped by
        `group_by` (USAGE_GROUP_BY_* values; USAGE_GROUP_BY_METADATA_KEY needs `metadata_key`).
        Follows every page and returns them as one response: all rows, and the totals. Times are
        datetimes (naive = UTC), unix seconds or Timestamps."""
        request = usage_request(start_time=start_time, end_time=end_time, group_by=group_by,
                                metadata_key=metadata_key, project=project, model=model, provider=provider,
                                page_size=page_size)
        result = usage_pb2.QueryUsageResponse()
        while True:
            page = self.usage.QueryUsage(request, metadata=self._md, timeout=self.timeout)
            result.rows.extend(page.rows)
            result.totals.CopyFrom(page.totals)
            if not page.next_page_token:
                return result
            request.page_token = page.next_page_token
