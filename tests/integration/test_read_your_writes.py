"""Every read issued after a write has returned sees that write, however many reads run beside it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import batch_file, start_harness
from tests.integration.batch_helpers import create

BACKGROUND_READERS = 64
SEQUENCES = 150
CONCURRENT_SEQUENCES = 10


@pytest.fixture
async def harness(tmp_path):
    # More uploads at once than the per-project default cap, which is not what this test is about.
    h = await start_harness(tmp_path / "data", max_uploads_per_project=CONCURRENT_SEQUENCES)
    try:
        yield h
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_a_write_is_visible_to_the_next_read_under_64_concurrent_readers(harness):
    a = harness.alice
    seed = await harness.upload(a, batch_file(1))
    seed_batch = await create(a, seed.id, model="simulated")
    stop = asyncio.Event()
    background_reads = 0

    async def reader(i: int) -> None:
        nonlocal background_reads
        while not stop.is_set():
            if i % 2:
                await a.files.ListFiles(file_pb2.ListFilesRequest(page_size=20), metadata=a.metadata)
            else:
                await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=seed_batch.id), metadata=a.metadata)
            background_reads += 1

    not_found: list[str] = []
    slots = asyncio.Semaphore(CONCURRENT_SEQUENCES)

    async def sequence(i: int) -> None:
        async with slots:
            try:
                uploaded = await harness.upload(a, batch_file(1), filename=f"ryw-{i}.jsonl")
                got = (await a.files.GetFile(file_pb2.GetFileRequest(file_id=uploaded.id), metadata=a.metadata)).file
                assert got.id == uploaded.id
                batch = await create(a, uploaded.id, model="simulated")
                seen = (await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id),
                                                 metadata=a.metadata)).batch
                assert seen.id == batch.id
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                not_found.append(f"sequence {i}: {err.details()}")

    readers = [asyncio.create_task(reader(i)) for i in range(BACKGROUND_READERS)]
    try:
        await asyncio.gather(*(sequence(i) for i in range(SEQUENCES)))
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert background_reads > SEQUENCES, "the readers ran alongside the sequences"
    assert not_found == [], f"{len(not_found)} of {SEQUENCES} sequences missed their own write: {not_found[:3]}"
