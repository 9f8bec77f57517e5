"""GetBatch answers a poller of an unchanged batch from the state it last read (api/batches.py
LatestStates, store refresh_batch): every read still asks the store, so a poller sees each new
state at once, and the per-project check runs on every call."""

from __future__ import annotations

import grpc
import pytest

from batchgate.v1 import batch_pb2
from tests.conftest import error_details, jsonl, request_line, start_harness
from tests.integration.batch_helpers import create, upstream_entry, watch_all, write_config


@pytest.fixture
async def slow_harness(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url, max_concurrency=1)])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        yield h
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def get(caller, batch_id: str) -> batch_pb2.Batch:
    return (await caller.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=caller.metadata)).batch


async def test_a_poller_sees_each_new_state_at_once(slow_harness):
    a = slow_harness.alice
    f = await slow_harness.upload(a, jsonl([request_line(f"r-{i}", model="fake-llm", content=f"SLOW:100 q {i}")
                                            for i in range(50)]))
    batch = await create(a, f.id)
    first = await get(a, batch.id)
    assert (await get(a, batch.id)).revision >= first.revision  # polled: that state known to the server
    cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                             metadata=a.metadata)).batch
    assert cancelled.revision > first.revision
    seen = await get(a, batch.id)
    assert seen.revision >= cancelled.revision
    assert seen.status in (batch_pb2.BATCH_STATUS_CANCELLING, batch_pb2.BATCH_STATUS_CANCELLED)
    final = (await watch_all(a, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    assert await get(a, batch.id) == final


async def test_another_project_cannot_read_a_batch_its_owner_polls(harness):
    a, b = harness.alice, harness.bob
    f = await harness.upload(a, jsonl([request_line("r-0", model="simulated")]))
    batch = await create(a, f.id, model="simulated")
    polled = await get(a, batch.id)
    for _ in range(2):  # the second read meets the state the owner's reads left behind, too
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(b, batch.id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(err.value)[0].reason == "BATCH_NOT_FOUND"
    assert (await get(a, batch.id)).id == polled.id
