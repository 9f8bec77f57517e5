"""Fan-out of batch changes to watchers.

Each watcher owns one slot that holds only the newest state: publishing is O(1)
per watcher and never waits, so a slow watcher cannot slow the tracker or the
other watchers; it just skips intermediate states (each state carries the whole
Batch, so nothing is lost but the in-between revisions).

Changes come from this replica's runners (publish) and, for batches another replica drives,
from the store's change feed: a (batch id, revision) wake-up after which the hub reads the batch
once for all of its watchers. Where no feed reaches across processes (SQLite), or to make up for
a lost notification, watched batches are also read every `poll_interval` seconds. Slots only take
a newer revision, so a state heard both ways reaches each watcher once, in revision order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator

from batchgate_server.domain.models import BatchRecord
from batchgate_server.store.errors import StorageError
from batchgate_server.store.ports import MetadataStore

log = logging.getLogger(__name__)


class WatchSlot:
    def __init__(self) -> None:
        self.latest: BatchRecord | None = None
        self._ready = asyncio.Event()

    def offer(self, batch: BatchRecord) -> None:
        if self.latest is None or batch.revision > self.latest.revision:
            self.latest = batch
            self._ready.set()

    async def next(self, timeout: float) -> BatchRecord | None:
        """The newest state not yet taken, or None after `timeout` seconds of quiet."""
        if not self._ready.is_set():
            try:
                # asyncio.timeout, not wait_for: no extra task per wait, which counts with
                # a thousand watchers waking on every change.
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return None
        self._ready.clear()
        return self.latest


class WatchHub:
    def __init__(self, store: MetadataStore | None = None, poll_interval: float = 0.0) -> None:
        self._slots: dict[str, set[WatchSlot]] = defaultdict(set)
        self._store = store
        self._poll_interval = poll_interval
        self._seen: dict[str, int] = {}  # watched batch -> newest revision its slots were offered
        self._wanted: dict[str, int] = {}  # watched batch -> newest revision heard of
        self._reading: dict[str, asyncio.Task] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._poller: asyncio.Task | None = None

    def start(self) -> None:
        if self._store is None:
            return
        self._unsubscribe = self._store.changes.subscribe(self._heard)
        if self._poll_interval > 0:
            self._poller = asyncio.create_task(self._poll(), name="watch-poll")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks = [t for t in (self._poller, *self._reading.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _heard(self, batch_id: str, revision: int) -> None:
        if batch_id in self._slots:
            # Checked once the current step is over: a change of this replica's own is
            # published right after its commit is announced, and needs no read.
            asyncio.get_running_loop().call_soon(self._want, batch_id, revision)

    def _want(self, batch_id: str, revision: int) -> None:
        if batch_id not in self._slots or revision <= self._seen.get(batch_id, 0):
            return
        self._wanted[batch_id] = max(revision, self._wanted.get(batch_id, 0))
        if batch_id not in self._reading:
            task = self._reading[batch_id] = asyncio.create_task(self._read(batch_id))
            task.add_done_callback(lambda _: self._reading.pop(batch_id, None))

    async def _read(self, batch_id: str) -> None:
        """Read the batch until its watchers have the newest revision heard of."""
        while batch_id in self._slots and self._wanted.get(batch_id, 0) > self._seen.get(batch_id, 0):
            try:
                record = await self._store.get_batch(batch_id)
            except StorageError as err:
                log.warning("watch: could not read batch %s: %s", batch_id, err)
                return  # the next notification or poll tries again
            if record is None:
                return
            self._wanted[batch_id] = max(self._wanted.get(batch_id, 0), record.revision)
            self.publish(record)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            watched = list(self._slots)
            if not watched:
                continue
            try:
                revisions = await self._store.batch_revisions(watched)
            except StorageError as err:
                log.warning("watch: could not poll watched batches: %s", err)
                continue
            for batch_id, revision in revisions.items():
                self._want(batch_id, revision)

    @contextlib.contextmanager
    def subscribe(self, batch_id: str) -> Iterator[WatchSlot]:
        slot = WatchSlot()
        self._slots[batch_id].add(slot)
        try:
            yield slot
        finally:
            slots = self._slots.get(batch_id)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._slots[batch_id]
                    self._seen.pop(batch_id, None)
                    self._wanted.pop(batch_id, None)

    def publish(self, batch: BatchRecord) -> None:
        """`batch` must be a snapshot the publisher will not mutate afterwards."""
        slots = self._slots.get(batch.id)
        if not slots:
            return
        if batch.revision > self._seen.get(batch.id, 0):
            self._seen[batch.id] = batch.revision
        for slot in slots:
            slot.offer(batch)

    def watcher_count(self, batch_id: str) -> int:
        return len(self._slots.get(batch_id, ()))
