"""The lease heartbeat (core/ownership.py Ownership.tick) and a batch that ends while it runs.

tick lists the runners, then reads which unfinished batches this replica owns: a runner whose
terminal write commits between the two is missing from the read though nobody took it. It must
not be taken for lost: lose() cancels its task, cutting the cleanup it does after its end (a
sharded parent's deletion of its shards' result files, a job's provider files). Seen on
PostgreSQL as "lost its lease" warnings for shards of one replica, ending in a burst."""

from __future__ import annotations

import time

from batchgate_server.core.ownership import Ownership
from batchgate_server.domain.models import BatchRecord, BatchStatus
from batchgate_server.store.sqlite.metadata import SqliteMetadataStore


class EndsDuringTheRead:
    """A tracker (ownership's Driver) whose one runner ends while the heartbeat reads the store."""

    def __init__(self, record: BatchRecord) -> None:
        self.record = record
        self.lost_ids: list[str] = []

    def running(self) -> dict[str, int]:
        return {self.record.id: self.record.revision} if self.record.status is BatchStatus.IN_PROGRESS else {}

    def lost(self, batch_id: str) -> None:
        self.lost_ids.append(batch_id)

    def changed(self, batch_id: str, revision: int) -> None:
        pass

    def adopt(self, record: BatchRecord) -> None:
        pass


async def test_a_batch_ending_during_the_heartbeat_is_not_taken_for_lost(tmp_path):
    store = await SqliteMetadataStore.open(tmp_path / "db.sqlite3")
    try:
        now = time.time()
        record = BatchRecord(id="batch_1", project="p", endpoint="/v1/chat/completions", input_file_id="file-1",
                             completion_window="24h", status=BatchStatus.IN_PROGRESS, created_at=now,
                             expires_at=now + 86400)
        ownership = Ownership(store, "replica-a")
        await store.renew_lease("replica-a", now, now + 60)
        await store.insert_batch(record, owner="replica-a")
        driver = EndsDuringTheRead(record)
        ownership._driver = driver
        owned_batches = store.owned_batches

        async def ends_first(replica: str) -> dict[str, int]:
            # The runner's terminal write commits just before the heartbeat's read.
            record.status = BatchStatus.COMPLETED
            await store.update_batch(record, owner="replica-a")
            return await owned_batches(replica)

        store.owned_batches = ends_first
        await ownership.tick()
        assert driver.lost_ids == [], "a batch that ended was taken for lost"
    finally:
        await store.close()
