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
from batchgate_server.core.auth import create_api_key
from tests.conftest import Caller, batch_file, error_details, jsonl, request_line, start_harness
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import create, results, write_config

# About SQLite and local disk themselves (tests/backends.py).
pytestmark = pytest.mark.local_stores


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


@pytest.fixture
async def remote(small_disk, tmp_path):
    """A server on the small disk with one remote deployment ("remote") on a fake OpenAI batch API
    whose jobs move only when the test says so: (harness, fake)."""
    api = FakeBatchAPI(api_key="sk-full", clock="manual")
    await api.start()
    config = write_config(tmp_path / "models.yaml", [{"model_name": "remote", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_key": "sk-full", "api_base": api.base_url, "poll_interval": 0.05,
        "max_retries": 2, "backoff_base": 0.01, "timeout": 5}}])
    h = await start_harness(small_disk.root / "data", config_file=config)
    try:
        yield h, api
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)
        await api.stop()


async def get_batch(caller, batch_id: str) -> batch_pb2.Batch:
    return (await caller.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=caller.metadata)).batch


async def started_remotely(h, api, lines: list[dict]) -> tuple[batch_pb2.Batch, str]:
    """A batch of `lines` on "remote", in progress: (batch, the fake's job id)."""
    known = set(api.batches)
    batch = await create(h.alice, (await h.upload(h.alice, jsonl(lines))).id)

    async def in_progress():
        return (await get_batch(h.alice, batch.id)).status == batch_pb2.BATCH_STATUS_IN_PROGRESS

    await poll_until(in_progress, f"{batch.id} in progress")
    [job] = set(api.batches) - known
    return batch, job


async def storage_full_logged(caplog, batch_id: str, says: str) -> None:
    async def logged():
        return any("storage full" in r.getMessage() and batch_id in r.getMessage() and says in r.getMessage()
                   for r in caplog.records)

    await poll_until(logged, f"the tracker to meet the full disk ({says})")


async def completed(caller, batch_id: str) -> batch_pb2.Batch:
    async def done():
        got = await get_batch(caller, batch_id)
        return got if got.status == batch_pb2.BATCH_STATUS_COMPLETED else None

    return await poll_until(done, f"{batch_id} to complete once space is back")


def questions(n: int, size: int = 10) -> list[dict]:
    return [request_line(f"q-{i}", model="remote", content=f"question {i} " + "x" * size) for i in range(n)]


async def test_a_batch_ending_on_a_full_disk_waits_for_space_then_completes(remote, small_disk, caplog):
    caplog.set_level(logging.WARNING, logger="batchgate_server.core.tracker")
    h, api = remote
    a = h.alice
    finishing, job = await started_remotely(h, api, questions(200))
    cancelled, _ = await started_remotely(h, api, questions(5))

    small_disk.fill()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=cancelled.id), metadata=a.metadata)
    assert_storage_full(err.value)
    api.run_to_end(job)
    await storage_full_logged(caplog, finishing.id, "database or disk is full")
    for batch_id in (finishing.id, cancelled.id):
        assert (await get_batch(a, batch_id)).status == batch_pb2.BATCH_STATUS_IN_PROGRESS, \
            "a full disk neither fails nor ends a batch"

    small_disk.free()
    final = await completed(a, finishing.id)
    out, errors = await results(a, final)
    assert sorted(line["custom_id"] for line in out) == sorted(f"q-{i}" for i in range(200))
    assert errors == [] and final.request_counts.completed == 200
    stopped = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=cancelled.id),
                                           metadata=a.metadata)).batch
    assert stopped.status == batch_pb2.BATCH_STATUS_CANCELLING
    await assert_nothing_half_written(h)


async def test_results_that_do_not_fit_are_written_again_once_space_is_back(remote, small_disk, caplog):
    caplog.set_level(logging.WARNING, logger="batchgate_server.core.tracker")
    h, api = remote
    a = h.alice
    batch, job = await started_remotely(h, api, questions(1000, size=1000))  # about 2 MB of results
    small_disk.fill(leave=256 * 1024)  # room for the batch's records, not for its result file
    api.run_to_end(job)
    await storage_full_logged(caplog, batch.id, "No space left on device")
    assert (await get_batch(a, batch.id)).status == batch_pb2.BATCH_STATUS_FINALIZING
    assert list((h.data_dir / "files" / "tmp").iterdir()) == [], "the cut result file is gone"

    small_disk.free()
    final = await completed(a, batch.id)
    out, _ = await results(a, final)
    assert sorted(line["custom_id"] for line in out) == sorted(f"q-{i}" for i in range(1000))
    await assert_nothing_half_written(h)


async def test_a_key_used_for_the_first_time_on_a_full_disk_still_reads(full_disk_harness, small_disk):
    # Its first use records last_used_at, a write the full disk may refuse: the call must go on.
    h = full_disk_harness
    _, secret = await create_api_key(h.server.store, "first-use")
    fresh = Caller(h.alice.files, h.alice.batches, (("authorization", f"Bearer {secret}"),), "first-use")
    await h.upload(h.alice, batch_file(10))
    small_disk.fill()
    listed = await fresh.files.ListFiles(file_pb2.ListFilesRequest(), metadata=fresh.metadata)
    assert list(listed.files) == []
