"""Fan-out of batch changes to watchers.

Each watcher owns one slot that holds only the newest state: publishing is O(1)
per watcher and never waits, so a slow watcher cannot slow the tracker or the
other watchers; it just skips intermediate states (each state carries the whole
Batch, so nothing is lost but the in-between revisions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator

from batchgate_server.domain.models import BatchRecord


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
    def __init__(self) -> None:
        self._slots: dict[str, set[WatchSlot]] = defaultdict(set)

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

    def publish(self, batch: BatchRecord) -> None:
        """`batch` must be a snapshot the publisher will not mutate afterwards."""
        for slot in self._slots.get(batch.id, ()):
            slot.offer(batch)

    def watcher_count(self, batch_id: str) -> int:
        return len(self._slots.get(batch_id, ()))
