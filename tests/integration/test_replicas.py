"""Replicas sharing one database and one blob store (separate batchgate-server processes):
a watcher on one replica follows a batch another drives, a cancel works from any replica, and a
replica killed with -9 has its batches taken over and resumed (not restarted) by another."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from batchgate.v1 import batch_pb2
from tests.conftest import jsonl, request_line, upload_requests
from tests.fakes.openai_compatible_upstream import FakeUpstream
from tests.integration.batch_helpers import TERMINAL, create, output_usage, results, upstream_entry, write_config
from tests.replicas import Cluster, stores  # noqa: F401 - stores is a fixture

pytestmark = pytest.mark.slow

CONCURRENCY = 4


@pytest.fixture
async def upstream():
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def cluster(tmp_path: Path, upstream, stores):
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-llm", upstream.base_url, max_concurrency=CONCURRENCY)])
    c = Cluster(tmp_path, stores, config, lease_timeout=2.0)
    yield c
    await c.close()


def slow_lines(n: int, ms: int) -> bytes:
    return jsonl([request_line(f"r-{i}", model="fake-llm", content=f"SLOW:{ms} question {i}") for i in range(n)])


async def upload_and_create(caller, content: bytes) -> batch_pb2.Batch:
    f = (await caller.files.UploadFile(upload_requests(content), metadata=caller.metadata)).file
    return await create(caller, f.id)


async def watch(caller, batch_id: str, until=None, timeout: float = 60,
                states: list | None = None) -> list[batch_pb2.Batch]:
    """States of `batch_id` as a watcher sees them (appended to `states` as they come), to the
    end or until `until(state)`."""
    states = [] if states is None else states
    async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id),
                                                 metadata=caller.metadata, timeout=timeout):
        if event.WhichOneof("event") == "batch":
            states.append(event.batch)
            if until is not None and until(event.batch):
                break
    return states


def assert_in_order(states: list[batch_pb2.Batch]) -> None:
    revisions = [s.revision for s in states]
    assert revisions == sorted(set(revisions)), f"revisions out of order or repeated: {revisions}"


async def test_watch_and_cancel_from_another_replica(cluster):
    a, b = await cluster.start(2)
    batch = await upload_and_create(a.caller, slow_lines(200, 40))
    seen_on_b: list[batch_pb2.Batch] = []
    on_b = asyncio.create_task(watch(b.caller, batch.id, states=seen_on_b))
    # The watcher on B follows the owner's progress on A.
    await watch(a.caller, batch.id, until=lambda s: any(
        b_state.request_counts.completed > 0 for b_state in seen_on_b))
    cancelled = (await b.caller.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                    metadata=b.caller.metadata)).batch
    assert cancelled.status == batch_pb2.BATCH_STATUS_CANCELLING
    states = await on_b
    assert_in_order(states)
    final = states[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    assert batch_pb2.BATCH_STATUS_CANCELLING in [s.status for s in states]
    out, err = await results(a.caller, final)
    assert sorted(line["custom_id"] for line in out + err) == sorted(f"r-{i}" for i in range(200))
    assert 0 < len(out) < 200
    # The replica that got the cancel does not drive the batch: the owner stopped sending.
    assert cluster.stores.scalar("SELECT count(*) FROM usage_ledger WHERE batch_id=?", (batch.id,)) == 1



async def test_a_poller_on_one_replica_sees_a_cancel_on_another_at_once(cluster):
    """B's GetBatch answers an unchanged batch from the state it last read: it must still see A's
    write the moment it returned (and CancelBatch answers only a stored state)."""
    a, b = await cluster.start(2)
    # 10 s of requests (4 at a time): still running at the cancel, however loaded the machine (50 of
    # 100 ms, 1.25 s, had ended before it once, in a full run beside other work).
    batch = await upload_and_create(a.caller, slow_lines(40, 1000))
    get = batch_pb2.GetBatchRequest(batch_id=batch.id)
    for _ in range(2):
        polled = (await b.caller.batches.GetBatch(get, metadata=b.caller.metadata)).batch
    cancelled = (await a.caller.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                    metadata=a.caller.metadata)).batch
    assert cancelled.revision > polled.revision
    seen = (await b.caller.batches.GetBatch(get, metadata=b.caller.metadata)).batch
    assert seen.revision >= cancelled.revision
    assert seen.status in (batch_pb2.BATCH_STATUS_CANCELLING, batch_pb2.BATCH_STATUS_CANCELLED)

async def test_cancel_of_an_ended_batch_from_another_replica(cluster, upstream):
    a, b = await cluster.start(2)
    batch = await upload_and_create(a.caller, slow_lines(3, 0))
    final = (await watch(a.caller, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    with pytest.raises(Exception) as caught:
        await b.caller.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                           metadata=b.caller.metadata)
    assert "BATCH_ALREADY_ENDED" in str(caught.value.debug_error_string()) or "already ended" in str(caught.value)


async def test_kill_9_of_the_owner_another_replica_resumes(cluster, upstream):
    a, b = await cluster.start(2)
    n = 240
    batch = await upload_and_create(a.caller, slow_lines(n, 40))
    # ~100 answers a second: a third of the batch is answered (and stored) before the kill.
    seen = await watch(b.caller, batch.id, until=lambda s: s.request_counts.completed >= n // 3)
    await asyncio.sleep(1.2)  # the executor stores its answers every second: let one store land
    await cluster.kill(a)
    killed_at = time.monotonic()
    sent_before = upstream.requests_total
    assert sent_before < n, "killed mid-batch"
    states = await watch(b.caller, batch.id, until=lambda s: s.request_counts.completed > sent_before)
    moved_on = time.monotonic() - killed_at
    final = (await watch(b.caller, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    out, err = await results(b.caller, final)
    assert sorted(line["custom_id"] for line in out) == sorted(f"r-{i}" for i in range(n)), \
        "every custom_id answered exactly once"
    assert not err and final.request_counts.completed == n
    # Counted from the stored answers rebuilt on b, then from b's own: the output file's usage.
    assert (final.usage.input_tokens, final.usage.output_tokens) == output_usage(out)
    # Resumed, not restarted: only what was in flight at the kill, or answered after the last
    # stored second, is sent again.
    resent = upstream.requests_total - n
    assert resent <= CONCURRENCY + 150 and resent < seen[-1].request_counts.completed
    assert moved_on < 3 * cluster.lease_timeout + 5, f"took {moved_on:.1f}s to move on"
    assert states
    assert cluster.stores.scalar("SELECT count(*) FROM usage_ledger WHERE batch_id=?", (batch.id,)) == 1
    assert cluster.stores.scalar("SELECT count(*) FROM executor_results WHERE batch_id=?", (batch.id,)) == 0


async def test_a_frozen_replica_loses_its_lease_and_writes_nothing_after(cluster, upstream):
    """SIGSTOP past the lease timeout: another replica adopts the batch; the frozen one, woken,
    finds its lease gone and stops without a write (its writes are fenced by the lease)."""
    a, b = await cluster.start(2)
    n = 200
    batch = await upload_and_create(a.caller, slow_lines(n, 40))
    await watch(b.caller, batch.id, until=lambda s: s.request_counts.completed >= 20)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        # b adopts it: the batch moves on while a is frozen.
        frozen_at = upstream.requests_total
        await watch(b.caller, batch.id, until=lambda s: s.request_counts.completed > frozen_at + 10)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    states = await watch(b.caller, batch.id)
    final = states[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    out, err = await results(b.caller, final)
    assert sorted(line["custom_id"] for line in out) == sorted(f"r-{i}" for i in range(n))
    assert not err
    assert cluster.stores.scalar("SELECT count(*) FROM usage_ledger WHERE batch_id=?", (batch.id,)) == 1
    assert cluster.stores.scalar("SELECT owner FROM batches WHERE id=?", (batch.id,)) != "", "still recorded"
    # a is alive and serving, and says it lost the lease.
    assert a.alive
    assert (await a.caller.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id),
                                            metadata=a.caller.metadata)).batch.revision == final.revision
    assert "lease lost" in cluster.log_of(a) or "lost its lease" in cluster.log_of(a)


async def test_replicas_starting_together_on_an_empty_database(cluster):
    """Both migrate the empty database at once: migrations take turns, both serve, and each sees
    what the other writes."""
    a, b = await cluster.start(2)
    batch = await upload_and_create(a.caller, slow_lines(2, 0))
    final = (await watch(b.caller, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    more = await upload_and_create(b.caller, slow_lines(2, 0))
    assert (await watch(a.caller, more.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    assert a.alive and b.alive
