"""The metadata port's leases (what core/ownership.py builds on), on every implementation, with two
replicas' stores opened on one database: adoption is exclusive, writes are fenced by the owner, a graceful stop
hands batches over, and the executor's answer segments are stored only by the owner."""

from __future__ import annotations

import asyncio
import time

import pytest

from batchgate_server.domain.models import BatchRecord, BatchStatus
from batchgate_server.store.errors import LeaseLost, RevisionConflict

LEASE = 10.0


def batch(batch_id: str, created_at: float | None = None) -> BatchRecord:
    now = created_at or time.time()
    return BatchRecord(id=batch_id, project="p", endpoint="/v1/chat/completions", input_file_id="file-1",
                       completion_window="24h", status=BatchStatus.VALIDATING, created_at=now, expires_at=now + 86400)


@pytest.fixture
async def two(database_backend):
    """Two stores on one database, as two replicas see it."""
    return [(await database_backend.open()).metadata for _ in range(2)]


async def test_a_live_lease_keeps_a_batch_and_an_expired_one_is_adopted_once(two):
    a, b = two
    now = time.time()
    await a.renew_lease("A", now, now + LEASE)
    await a.insert_batch(batch("batch_1"), owner="A")
    assert await b.adopt_batches("B", now, 100) == [], "A's lease is live"
    assert await a.owned_batches("A") == {"batch_1": 1}
    later = now + LEASE + 1  # A stopped renewing; B and C did (each renews before it adopts)
    await a.renew_lease("C", later, later + LEASE)
    await b.renew_lease("B", later, later + LEASE)
    adopted = await asyncio.gather(a.adopt_batches("C", later, 100), b.adopt_batches("B", later, 100))
    assert sorted(len(x) for x in adopted) == [0, 1], "two replicas adopting at once: one gets it"
    winner = "C" if adopted[0] else "B"
    assert await a.owned_batches(winner) == {"batch_1": 1} and await a.owned_batches("A") == {}


async def test_unowned_batches_are_adopted_oldest_first_and_in_bounded_scans(two):
    a, b = two
    now = time.time()
    await a.renew_lease("A", now, now + LEASE)
    await b.renew_lease("B", now, now + LEASE)
    for i in range(5):
        await a.insert_batch(batch(f"batch_{i}", created_at=1000.0 + i))
    first = await b.adopt_batches("B", time.time(), 2)
    assert [r.id for r in first] == ["batch_0", "batch_1"]
    assert [r.id for r in await a.adopt_batches("A", time.time(), 10)] == ["batch_2", "batch_3", "batch_4"]


async def test_writes_are_fenced_by_the_owner(two):
    a, b = two
    now = time.time()
    await a.insert_batch(batch("batch_1"), owner="A")
    [adopted] = await b.adopt_batches("B", now, 10)  # A has no lease row: nobody holds it
    stale = batch("batch_1")
    stale.status = BatchStatus.IN_PROGRESS
    with pytest.raises(LeaseLost):
        await a.update_batch(stale, owner="A")
    assert (await b.get_batch("batch_1")).status is BatchStatus.VALIDATING, "A wrote nothing"
    adopted.status = BatchStatus.IN_PROGRESS
    await b.update_batch(adopted, owner="B")
    with pytest.raises(RevisionConflict):  # the owner itself with a stale revision
        await b.update_batch(batch("batch_1"), owner="B")


async def test_own_batches_are_taken_back_and_a_graceful_stop_hands_them_over(two):
    a, b = two
    now = time.time()
    await a.renew_lease("A", now, now + LEASE)
    await a.insert_batch(batch("batch_1"), owner="A")
    assert [r.id for r in await a.adopt_batches("A", now, 10, own=True)] == ["batch_1"]
    await a.release_batches("A")
    assert [r.id for r in await b.adopt_batches("B", now, 10)] == ["batch_1"], "no wait for the lease"


async def test_ended_batches_are_never_adopted(two):
    a, b = two
    record = batch("batch_1")
    await a.insert_batch(record, owner="A")
    record.status = BatchStatus.COMPLETED
    await a.update_batch(record, owner="A")
    assert await b.adopt_batches("B", time.time() + 3600, 10) == []


async def test_answer_segments_are_stored_by_the_owner_only_and_once(two):
    a, b = two
    await a.insert_batch(batch("batch_1"), owner="A")
    await a.append_results("batch_1", 0, "run-a", b'{"custom_id":"x"}\n', b"", owner="A")
    with pytest.raises(LeaseLost):
        await b.append_results("batch_1", 1, "run-b", b'{"custom_id":"y"}\n', b"", owner="B")
    await b.adopt_batches("B", time.time(), 10)
    with pytest.raises(Exception):  # segment 0 exists: a second writer of it fails
        await b.append_results("batch_1", 0, "run-b", b"", b"", owner="B")
    await b.append_results("batch_1", 1, "run-b", b"", b'{"custom_id":"y"}\n', owner="B")
    assert await a.read_results("batch_1") == [("run-a", b'{"custom_id":"x"}\n', b""),
                                               ("run-b", b"", b'{"custom_id":"y"}\n')]
    await a.delete_results("batch_1")
    assert await b.read_results("batch_1") == []


async def test_batch_changes_are_announced_to_every_store_on_the_database(two):
    a, b = two
    heard: list[tuple[str, int]] = []
    got_second = asyncio.Event()

    def listener(batch_id: str, revision: int) -> None:
        heard.append((batch_id, revision))
        if revision == 3:
            got_second.set()

    unsubscribe = b.changes.subscribe(listener)
    await asyncio.sleep(0.2)  # a feed listening on a connection of its own is listening by now
    record = batch("batch_1")
    await a.insert_batch(record)
    for _ in range(2):
        record.status = BatchStatus.IN_PROGRESS
        await a.update_batch(record)
    await asyncio.wait_for(got_second.wait(), 5)
    unsubscribe()
    record.status = BatchStatus.FINALIZING
    await a.update_batch(record)
    await asyncio.sleep(0.2)
    assert heard == [("batch_1", 2), ("batch_1", 3)], "each revision once, in order, none after unsubscribing"
