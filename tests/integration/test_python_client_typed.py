"""The Python client's typed errors, readable results and retries, against the real server."""

from __future__ import annotations

import asyncio
import datetime
import json
import threading

import grpc
import pytest

import batchgate
from batchgate import (
    AsyncBatchgateClient,
    Batch,
    BatchgateClient,
    BatchgateError,
    BatchStatus,
    File,
    FilePurpose,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import (
    MASTER_KEY,
    batch_file,
    free_port,
    jsonl,
    request_line,
    serving,
    start_harness,
    stop_harness,
    upload_requests,
)


def api_key(caller) -> str:
    return dict(caller.metadata)["authorization"].removeprefix("Bearer ")


def bad_file() -> bytes:
    good = jsonl([request_line("a"), request_line("b")])
    return good + b"{broken\n" + json.dumps({"custom_id": "c", "method": "POST"}).encode() + b"\n"


async def test_errors_are_typed_with_reason_metadata_and_line_violations(harness):
    async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key(harness.alice)) as bg:
        with pytest.raises(NotFoundError) as missing:
            await bg.get_file("file-nope")
        with pytest.raises(InvalidArgumentError) as invalid:
            await bg.upload_file(bad_file(), filename="bad.jsonl")

    err = missing.value
    assert isinstance(err, BatchgateError) and isinstance(err, grpc.RpcError), "old `except grpc.RpcError` works"
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.reason == "FILE_NOT_FOUND"
    assert err.domain == "batchgate.dev" and err.metadata == {"file_id": "file-nope"}
    assert str(err) == "NOT_FOUND FILE_NOT_FOUND: file 'file-nope' not found"
    # The contract's enum: the same string, and the member for those who switch on it.
    assert err.reason == batchgate.ErrorReason.FILE_NOT_FOUND and err.reason_enum is batchgate.ErrorReason.FILE_NOT_FOUND

    bad = invalid.value
    assert bad.reason == "INVALID_BATCH_FILE" and bad.reason_enum is batchgate.ErrorReason.INVALID_BATCH_FILE
    assert bad.lines == [3, 4, 4] and bad.violations[0].field == "line 3"
    assert bad.violations[0].description.startswith("invalid_json_line")
    assert "line 4: missing_url" in str(bad) or "line 4: unsupported_url" in str(bad)


async def test_the_sync_client_raises_the_same_types(harness):
    def run():
        with BatchgateClient(f"127.0.0.1:{harness.port}", api_key(harness.alice)) as bg:
            errors = []
            for call in (lambda: bg.get_batch("batch_nope"), lambda: bg.upload_file(bad_file()),
                         lambda: list(bg.iter_file("file-nope")), lambda: list(bg.watch("batch_nope"))):
                try:
                    call()
                except BatchgateError as err:
                    errors.append((type(err), err.reason))
            return errors

    assert await asyncio.to_thread(run) == [(NotFoundError, "BATCH_NOT_FOUND"),
                                            (InvalidArgumentError, "INVALID_BATCH_FILE"),
                                            (NotFoundError, "FILE_NOT_FOUND"), (NotFoundError, "BATCH_NOT_FOUND")]


async def test_too_many_uploads_carries_its_retry_delay(tmp_path):
    h = await start_harness(tmp_path / "d", max_uploads_per_project=1)
    release = asyncio.Event()

    async def held():
        for message in upload_requests(b""):
            if message.WhichOneof("payload") == "finish":
                await release.wait()
            yield message

    a = h.alice
    holding = a.files.UploadFile(held(), metadata=a.metadata)
    try:
        while h.server.files.uploads_in_progress("alice") < 1:
            await asyncio.sleep(0.01)
        async with AsyncBatchgateClient(f"127.0.0.1:{h.port}", api_key(a)) as bg:
            with pytest.raises(ResourceExhaustedError) as err:
                await bg.upload_file(batch_file(1), filename="in.jsonl")
        assert err.value.reason == "TOO_MANY_UPLOADS"
        assert isinstance(err.value.retry_delay, datetime.timedelta) and err.value.retry_delay.total_seconds() > 0
    finally:
        release.set()
        holding.cancel()
        await stop_harness(h)


async def test_results_read_as_enums_and_datetimes_over_the_generated_messages(harness):
    async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key(harness.alice)) as bg:
        f = await bg.upload_file(batch_file(5), filename="in.jsonl")
        batch = await bg.create_batch(f.id, "/v1/chat/completions", model="simulated")
        final = await bg.wait(batch.id)

    assert isinstance(f, File) and f.purpose is FilePurpose.BATCH and str(f.purpose) == "batch"
    assert isinstance(f.message, file_pb2.File) and f == f.message and f.filename == "in.jsonl"
    assert f.created_at.tzinfo is datetime.timezone.utc and f.expires_at is None
    assert isinstance(final, Batch) and final.status is BatchStatus.COMPLETED and final.done
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, "the enum equals the generated constant"
    assert str(final.status) == "completed" and f"{final.status}" == "completed"
    assert final.completed_at >= final.created_at and final.cancelled_at is None
    assert final.request_counts.completed == 5 and isinstance(final.message, batch_pb2.Batch)
    assert repr(final).startswith(f"Batch(id='{final.id}', status=completed")
    assert BatchStatus.parse("in_progress") is BatchStatus.IN_PROGRESS is BatchStatus.parse("BATCH_STATUS_IN_PROGRESS")
    with pytest.raises(ValueError, match="not one of"):
        BatchStatus.parse("done")


async def test_calls_are_retried_while_the_server_is_unavailable_and_create_only_once(tmp_path):
    """The server is down when the calls start; it comes back while they back off. The create and
    the upload succeed once each: their retries carry the same (made-up) request_id."""
    port = free_port()
    data = tmp_path / "data"
    patient = RetryPolicy(attempts=40, initial_backoff=0.05, max_backoff=0.25)
    bg = BatchgateClient(f"127.0.0.1:{port}", MASTER_KEY, retry=patient)
    failed = threading.Event()
    bg.channel.subscribe(lambda state: state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and failed.set())
    h = await start_harness(data, address=f"127.0.0.1:{port}")
    f = await h.upload(h.admin, batch_file(3))
    await stop_harness(h)
    try:
        with pytest.raises(UnavailableError):
            BatchgateClient(f"127.0.0.1:{port}", MASTER_KEY, retry=batchgate.NO_RETRIES).get_file(f.id)

        def calls():
            return (bg.create_batch(f.id, "/v1/chat/completions", model="simulated"),
                    bg.upload_file(batch_file(2), filename="again.jsonl"))

        running = asyncio.create_task(asyncio.to_thread(calls))
        assert await asyncio.to_thread(failed.wait, 30), "the first attempt failed: the server is down"
        h = await start_harness(data, address=f"127.0.0.1:{port}")
        batch, uploaded = await asyncio.wait_for(running, 60)
        assert batch.input_file_id == f.id and uploaded.filename == "again.jsonl"
        assert [b.id for b in await asyncio.to_thread(lambda: list(bg.list_batches()))] == [batch.id]
        names = sorted(x.filename for x in await asyncio.to_thread(lambda: list(bg.list_files())))
        assert names == ["again.jsonl", "requests.jsonl"]
    finally:
        bg.close()
        await stop_harness(h)


async def test_a_download_resumes_after_the_last_byte_when_its_stream_drops(tmp_path):
    """The server stops mid-download and starts again: the client asks for the rest from the
    offset it had reached, and the file is still verified whole."""
    port = free_port()
    data = tmp_path / "data"
    h = await start_harness(data, address=f"127.0.0.1:{port}")
    content = batch_file(30_000)
    f = await h.upload(h.admin, content)
    got = bytearray()
    first_chunk = asyncio.Event()
    loop = asyncio.get_running_loop()
    patient = RetryPolicy(attempts=40, initial_backoff=0.05, max_backoff=0.25)

    def download():
        with BatchgateClient(f"127.0.0.1:{port}", MASTER_KEY, retry=patient) as bg:
            for data_chunk in bg.iter_file(f.id):
                if not got:
                    loop.call_soon_threadsafe(first_chunk.set)
                    stopped.wait(30)
                got.extend(data_chunk)

    stopped = threading.Event()
    running = asyncio.create_task(asyncio.to_thread(download))
    await asyncio.wait_for(first_chunk.wait(), 30)
    await stop_harness(h)  # 3 MB: more than gRPC's flow-control windows hold, so the stream breaks
    stopped.set()
    async with serving(data, address=f"127.0.0.1:{port}"):
        await asyncio.wait_for(running, 60)
    assert bytes(got) == content
