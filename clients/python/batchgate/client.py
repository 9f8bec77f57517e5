"""Synchronous client: blocking calls, usable from plain scripts and from any thread.

    from batchgate import BatchgateClient
    with BatchgateClient("localhost:50051", api_key="bg-…") as bg:
        f = bg.upload_file("requests.jsonl")
        batch = bg.create_batch(f.id, "/v1/chat/completions")
        for state in bg.watch(batch.id):
            print(state.status, state.request_counts)
        bg.download_file(state.output_file_id, "results.jsonl")

The logic of every method is in _steps.py (shared with the asyncio client); this module only runs
its steps with the blocking stubs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import grpc

from batchgate import _batch_helpers, _steps
from batchgate._base import ClientBase
from batchgate._batch_helpers import Answers
from batchgate._common import DEFAULT_CHUNK, TLS, TimeLike
from batchgate._steps import Blocking, Call, Emit, Open, Read, RetryPolicy, Sleep, Steps, Stepper
from batchgate.errors import from_rpc_error
from batchgate.types import TERMINAL_STATUSES, Batch, File
from batchgate.v1 import file_pb2, usage_pb2

__all__ = ["BatchgateClient", "TERMINAL_STATUSES"]


class BatchgateClient(ClientBase):
    __doc__ = ClientBase.__doc__

    def __init__(self, target: str | None = None, api_key: str | None = None, *, channel: grpc.Channel | None = None,
                 timeout: float | None = 60.0, retry: RetryPolicy | None = None,
                 tls: TLS | bool | None = None) -> None:
        super().__init__(grpc, target, api_key, channel=channel, timeout=timeout, retry=retry, tls=tls)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "BatchgateClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the runner ---------------------------------------------------------------------------

    def _perform(self, op: Any) -> Any:
        if isinstance(op, (Call, Open)):
            return self._start(op)
        if isinstance(op, Read):
            return next(op.stream, None)
        if isinstance(op, Sleep):
            time.sleep(op.seconds)
            return None
        if isinstance(op, Blocking):
            return op.fn(*op.args)
        raise TypeError(f"unknown step {op!r}")

    def _advance(self, stepper: Stepper) -> None:
        try:
            value = self._perform(stepper.op)
        except grpc.RpcError as err:
            stepper.fail(from_rpc_error(err))
        else:
            stepper.resolve(value)

    def _run(self, steps: Steps[Any]) -> Any:
        stepper = Stepper(steps)
        try:
            while stepper.op is not None:
                self._advance(stepper)
            return stepper.result
        finally:
            stepper.close()

    def _iterate(self, steps: Steps[None]) -> Iterator[Any]:
        stepper = Stepper(steps)
        try:
            while (op := stepper.op) is not None:
                if isinstance(op, Emit):
                    yield op.value
                    stepper.resolve(None)
                else:
                    self._advance(stepper)
        finally:
            stepper.close()

    # -- files --------------------------------------------------------------------------------

    def upload_file(self, source: str | os.PathLike | BinaryIO | bytes, *, filename: str | None = None,
                    purpose: int = file_pb2.FILE_PURPOSE_BATCH, request_id: str = "",
                    expires_after_seconds: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> File:
        """Upload from a path (size and sha256 sent for the server to verify), bytes, or a binary
        stream. Retried on UNAVAILABLE under a request_id (made up when not given) unless the
        source cannot be read again."""
        return self._run(_steps.upload_file(self.options, source, filename=filename, purpose=purpose,
                                            request_id=request_id, expires_after_seconds=expires_after_seconds,
                                            chunk_size=chunk_size))

    def get_file(self, file_id: str) -> File:
        return self._run(_steps.get_file(self.options, file_id))

    def list_files(self, *, purpose: int = 0, page_size: int = 100) -> Iterator[File]:
        """Every file, following page tokens."""
        return self._iterate(_steps.list_files(self.options, purpose=purpose, page_size=page_size))

    def iter_file(self, file_id: str, *, offset: int = 0, limit: int = 0) -> Iterator[bytes]:
        return self._iterate(_steps.iter_file(self.options, file_id, offset=offset, limit=limit))

    def download_file(self, file_id: str, path: str | os.PathLike, *, resume: bool = False) -> int:
        """Download to `path`, replacing it only once size and sha256 match the file record
        (DownloadVerificationError otherwise; `path` stays as it was). With `resume`, an interrupted
        download kept in `<path>.part` is continued. Returns the bytes received."""
        return self._run(_steps.download_file(self.options, file_id, path, resume=resume))

    def delete_file(self, file_id: str) -> bool:
        return self._run(_steps.delete_file(self.options, file_id))

    # -- batches ------------------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str = "", *, completion_window: str = "24h",
                     metadata: dict[str, str] | None = None, model: str = "", provider: str = "",
                     request_id: str = "", model_map: dict[str, str] | None = None,
                     spread: bool = False) -> Batch:
        """endpoint "": the file's own (a file may mix endpoints); model_map routes a file model
        (body.model) to a model name, "provider/model" or deployment id; spread cuts the batch
        across every deployment of its model."""
        return self._run(_steps.create_batch(self.options, input_file_id, endpoint,
                                             completion_window=completion_window, metadata=metadata, model=model,
                                             provider=provider, request_id=request_id, model_map=model_map,
                                             spread=spread))

    def get_batch(self, batch_id: str) -> Batch:
        return self._run(_steps.get_batch(self.options, batch_id))

    def list_batches(self, *, statuses: Iterable[int] = (), page_size: int = 100) -> Iterator[Batch]:
        return self._iterate(_steps.list_batches(self.options, statuses=statuses, page_size=page_size))

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._run(_steps.cancel_batch(self.options, batch_id))

    def watch(self, batch_id: str, *, start_revision: int = 0, reconnect_delay: float = 0.5,
              max_reconnects: int = 20) -> Iterator[Batch]:
        """Every state of the batch until it ends, reconnecting from the last revision seen."""
        return self._iterate(_steps.watch(self.options, batch_id, start_revision=start_revision,
                                          reconnect_delay=reconnect_delay, max_reconnects=max_reconnects))

    def wait(self, batch_id: str) -> Batch:
        """Block until the batch ends; returns its final state."""
        return self._run(_steps.wait(self.options, batch_id))

    # -- usage --------------------------------------------------------------------------------

    def query_usage(self, *, start_time: TimeLike = None, end_time: TimeLike = None, group_by: Iterable[int] = (),
                    metadata_key: str = "", project: str = "", model: str = "", provider: str = "",
                    page_size: int = 1000) -> usage_pb2.QueryUsageResponse:
        """Usage and cost of the batches that ended in [start_time, end_time), grouped by
        `group_by` (USAGE_GROUP_BY_* values; USAGE_GROUP_BY_METADATA_KEY needs `metadata_key`).
        Follows every page and returns them as one response: all rows, and the totals. Times are
        datetimes (naive = UTC), unix seconds or Timestamps."""
        return self._run(_steps.query_usage(self.options, start_time=start_time, end_time=end_time,
                                            group_by=group_by, metadata_key=metadata_key, project=project,
                                            model=model, provider=provider, page_size=page_size))

    # -- batch helpers ------------------------------------------------------------------------

    def batch_completion(self, model: str, messages: Sequence[Sequence[dict[str, Any]]], *,
                         metadata: dict[str, str] | None = None, **params: Any) -> Answers:
        """Each message list as one chat request to `model` (with `params` such as temperature in
        every body), run as one batch; the Answers in input order, failed items with `error` set."""
        return self._run(_batch_helpers.run(self.options, model, _batch_helpers.CHAT,
                                            _batch_helpers.completion_bodies(messages, params), metadata=metadata))

    def embed(self, model: str, texts: Sequence[str], *, metadata: dict[str, str] | None = None,
              **params: Any) -> Answers:
        """Each text embedded by `model` in one batch; `answer.embedding` is its vector."""
        return self._run(_batch_helpers.run(self.options, model, _batch_helpers.EMBEDDINGS,
                                            _batch_helpers.embedding_bodies(texts, params), metadata=metadata))
