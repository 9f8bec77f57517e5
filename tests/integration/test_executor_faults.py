"""The built-in executor under faults: odd stored input, an upstream outage, a full disk, a failing
deployment watched live. The real server, the real fake upstream."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from batchgate.v1 import batch_pb2
from batchgate_server.core.ids import new_file_id
from batchgate_server.core.models import FilePurpose, FileRecord
from tests.conftest import jsonl, request_line, start_harness
from tests.fakes.openai_compatible_upstream import FakeUpstream
from tests.integration.batch_helpers import TERMINAL, create, results, upstream_entry, write_config


@pytest.fixture
async def upstream():
    up = FakeUpstream()
    await up.start()
    try:
        yield up
    finally:
        await up.stop()


async def executor_harness(tmp_path, upstream, **params):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url, **params)])
    return await start_harness(tmp_path / "data", config_file=config)


async def stop_harness(h) -> None:
    await h.channel.close()
    await h.server.stop(grace=0)


async def store_unchecked_file(h, project: str, content: bytes) -> str:
    """A batch input file written straight through the blob and metadata stores, skipping upload
    validation: the executor must cope with whatever a stored file holds."""
    writer = h.server.tracker.blobs.open_writer()
    writer.write(content)
    file_id = new_file_id()
    writer.commit(file_id)
    await h.server.store.insert_file(FileRecord(
        id=file_id, project=project, filename="stored.jsonl", purpose=FilePurpose.BATCH, bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(), created_at=time.time(), line_count=content.count(b"\n"),
        endpoint="/v1/chat/completions", model="fake-llm"))
    return file_id


async def watch_until(caller, batch_id: str, done, timeout: float = 20.0) -> list[batch_pb2.Batch]:
    """Every Batch a watcher sees until `done(batch)` holds; fails after `timeout` seconds."""
    states = []

    async def watch():
        async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id),
                                                     metadata=caller.metadata):
            if event.WhichOneof("event") == "batch":
                states.append(event.batch)
                if done(event.batch):
                    return

    try:
        await asyncio.wait_for(watch(), timeout)
    except asyncio.TimeoutError:
        last = states[-1] if states else None
        pytest.fail(f"batch {batch_id} did not get there within {timeout}s; last seen: {last}")
    return states


def ended(batch: batch_pb2.Batch) -> bool:
    return batch.status in TERMINAL


# -- item 3: one request can never cost a worker or an answer --------------------------------------


async def test_lone_surrogate_custom_ids_are_answered_and_cost_no_worker(tmp_path, upstream):
    """A JSON-escaped lone surrogate is valid JSON but not UTF-8: it used to kill the worker that
    wrote its result (20 such lines against 8 workers stalled the batch at IN_PROGRESS; fewer
    dropped their answers from a COMPLETED batch)."""
    h = await executor_harness(tmp_path, upstream)
    try:
        odd = [f"\ud800-{i}" for i in range(20)] + ["tail \udfff"]
        lines = [request_line(cid, model="fake-llm", content=f"odd {i}") for i, cid in enumerate(odd)]
        lines += [request_line(f"plain-{i}", model="fake-llm", content=f"plain {i}") for i in range(3)]
        file_id = await store_unchecked_file(h, h.alice.project, jsonl(lines))
        batch = await create(h.alice, file_id)
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        out, err = await results(h.alice, final)
        assert sorted(line["custom_id"] for line in out + err) == sorted(line["custom_id"] for line in lines)
        assert final.request_counts.completed == len(out) and final.request_counts.failed == len(err)
        # Sent and answered like any other request: the id is ours to echo, not the upstream's concern.
        assert {line["custom_id"] for line in out} >= set(odd)
        assert len({line["id"] for line in out + err}) == len(lines)
    finally:
        await stop_harness(h)
