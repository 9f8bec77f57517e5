"""A full disk, for real (a small tmpfs filled to the last byte): every write is RESOURCE_EXHAUSTED
STORAGE_FULL with RetryInfo, nothing is left half-written, DeleteFile still works and frees the
space, and a running batch waits for space instead of failing or losing results."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import batch_file, error_details, request_line, jsonl, start_harness
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import create, results, write_config


def assert_storage_full(err: grpc.aio.AioRpcError) -> None:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    info, _ = error_details(err)
    assert info.reason == "STORAGE_FULL" and info.domain == "batchgate.dev"
    retry = [d for d in rpc_status.from_call(err).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "a full disk is worth retrying once space is freed: RetryInfo says when"


async def assert_nothing_half_written(h) -> set[str]:
    """Returns the ids of the recorded files."""
    files = h.data_dir / "files"
    assert list((files / "tmp").iterdir()) == [], "no temporary upload left behind"
    blobs = {p.name for p in (files / "blobs").glob("*/*")}
    recorded = await file_ids(h)
    assert blobs == recorded, "every blob has its record and every record its blob"
    return recorded


async def file_ids(h) -> set[str]:
    return {f.id for f in (await h.admin.files.ListFiles(file_pb2.ListFilesRequest(page_size=100),
                                                          metadata=h.admin.metadata)).files}


async def poll_until(predicate, what: str, timeout: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await predicate()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return result


@pytest.fixture
async def full_disk_harness(small_disk):
    h = await start_harness(small_disk.root / "data")
    try:
        yield h
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_writes_on_a_full_disk_are_storage_full_and_leave_nothing_half_written(full_disk_harness, small_disk):
    h = full_disk_harness
    a = h.alice
    kept = await h.upload(a, batch_file(3000))  # about 300 KB to free later
    small_disk.fill()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.upload(a, batch_file(2000))
    assert_storage_full(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(a, kept.id, model="simulated")
    assert_storage_full(err.value)
    listed = await a.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=a.metadata)
    assert list(listed.batches) == [], "no batch recorded"
    assert await assert_nothing_half_written(h) == {kept.id}

    # Deleting frees space even now, through the API.
    before = small_disk.free_bytes
    await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=kept.id), metadata=a.metadata)
    assert await file_ids(h) == set()
    assert small_disk.free_bytes >= before + kept.bytes
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.files.GetFile(file_pb2.GetFileRequest(file_id=kept.id), metadata=a.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Once space is back, everything works again.
    small_disk.free()
    again = await h.upload(a, batch_file(2000))
    assert (await create(a, again.id, model="simulated")).status == batch_pb2.BATCH_STATUS_VALIDATING


async def test_deletes_keep_working_on_a_disk_that_stays_full(full_disk_harness, small_disk):
    h = full_disk_harness
    a = h.alice
    uploaded = [await h.upload(a, batch_file(300), filename=f"f{i}.jsonl") for i in range(20)]
    small_disk.fill()
    for f in uploaded:
        await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=a.metadata)
        small_disk.fill()  # whatever a delete freed is taken again at once
    assert await file_ids(h) == set()


async def test_a_running_batch_waits_out_a_full_disk_and_completes_with_every_result(small_disk, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="batchgate_server.core.tracker")
    api = FakeBatchAPI(api_key="sk-full", clock="manual")
    await api.start()
    config = write_config(tmp_path / "models.yaml", [{"model_name": "remote", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_key": "sk-full", "api_base": api.base_url, "poll_interval": 0.05,
        "max_retries": 2, "backoff_base": 0.01, "timeout": 5}}])
    h = await start_harness(small_disk.root / "data", config_file=config)
    try:
        a = h.alice
        lines = [request_line(f"q-{i}", model="remote", content=f"question {i}") for i in range(200)]

        async def in_progress(batch_id: str) -> None:
            async def started():
                got = (await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id),
                                                metadata=a.metadata)).batch
                return got.status == batch_pb2.BATCH_STATUS_IN_PROGRESS
            await poll_until(started, f"{batch_id} in progress")

        finishing = await create(a, (await h.upload(a, jsonl(lines))).id)
        await in_progress(finishing.id)
        [provider_job] = list(api.batches)
        cancelled = await create(a, (await h.upload(a, jsonl(lines[:5]))).id)
        await in_progress(cancelled.id)

        small_disk.fill()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=cancelled.id), metadata=a.metadata)
        assert_storage_full(err.value)

        api.run_to_end(provider_job)

        async def hit_full_disk():
            return any("storage full" in r.getMessage() and finishing.id in r.getMessage() for r in caplog.records)
        await poll_until(hit_full_disk, "the tracker to meet the full disk")
        for batch_id in (finishing.id, cancelled.id):
            got = (await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=a.metadata)).batch
            assert got.status == batch_pb2.BATCH_STATUS_IN_PROGRESS, "a full disk neither fails nor ends a batch"

        small_disk.free()

        async def completed():
            got = (await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=finishing.id),
                                            metadata=a.metadata)).batch
            return got if got.status == batch_pb2.BATCH_STATUS_COMPLETED else None
        final = await poll_until(completed, "the batch to complete once space is back")
        out, errors = await results(a, final)
        assert sorted(line["custom_id"] for line in out) == sorted(f"q-{i}" for i in range(200))
        assert errors == [] and final.request_counts.completed == 200
        stopped = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=cancelled.id),
                                               metadata=a.metadata)).batch
        assert stopped.status == batch_pb2.BATCH_STATUS_CANCELLING
        assert list((h.data_dir / "files" / "tmp").iterdir()) == []
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)
        await api.stop()
