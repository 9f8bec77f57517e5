"""Which replica drives which batch: leases in the shared database.

Each unfinished batch is owned by one replica (batches.owner). A replica's leases on all its
batches last until its own lease expiry, which one heartbeat statement renews; a replica that
stops renewing (killed, frozen, cut off) loses them all at once when it expires, and any other
replica adopts its batches with a compare-and-set (the store's adopt_batches). Every write of a
batch's runner is conditioned on owning it (update_batch owner=), so a replica that lost its
lease can never write over the one that took over; it stops its runners as soon as it notices.

The replica id is kept in the data directory: a replica restarting on its own data directory
(one process per directory, store/lock.py) takes its batches straight back instead of waiting
for its old lease to run out, which is also how a single server resumes at once after a crash.

StoredProgress is the owner's side of the executor's shared answers (providers/executor/progress.py):
segments in the store, written under the same lease.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from batchgate_server.domain.models import BatchRecord
from batchgate_server.providers.base import SharedProgress
from batchgate_server.store.errors import Duplicate, LeaseLost, StorageError
from batchgate_server.store.ports import MetadataStore

log = logging.getLogger(__name__)

REPLICA_ID_FILE = "replica-id"
DEFAULT_LEASE_TIMEOUT = 15.0
# Batches adopted per scan: a replica taking over a dead one's hundreds of batches does it in a
# few scans instead of one long transaction that would hold the database's write lock.
ADOPT_PER_SCAN = 200


def replica_id(data_dir: Path) -> str:
    """This data directory's replica id, created on first use."""
    path = data_dir / REPLICA_ID_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    made = f"replica-{secrets.token_hex(6)}"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(made + "\n")
        tmp.replace(path)
    except OSError as err:  # a full disk: serve anyway; a restart then waits for this lease to expire
        log.warning("could not keep the replica id in %s (%s); using %s for this run", path, err, made)
    return made


class Driver(Protocol):
    """What ownership needs of the tracker."""

    def adopt(self, record: BatchRecord) -> None: ...
    def running(self) -> dict[str, int]: ...  # batch id -> the revision its runner holds
    def lost(self, batch_id: str) -> None: ...
    def changed(self, batch_id: str, revision: int) -> None: ...


class Ownership:
    """Holds this replica's leases: heartbeat, adoption of others' expired batches, detection of
    leases it lost. Every `lease_timeout / 3` seconds, so a dead replica's batches move on within
    about 4/3 of the lease timeout."""

    def __init__(self, store: MetadataStore, replica: str, lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.replica = replica
        self.lease_timeout = lease_timeout
        self.interval = lease_timeout / 3
        self._clock = clock
        self._task: asyncio.Task | None = None
        self._driver: Driver | None = None

    async def start(self, driver: Driver) -> list[BatchRecord]:
        """Renew this replica's lease and take its own unfinished batches back, with any nobody
        holds; returns them (the caller adopts them before serving), then keeps the leases."""
        self._driver = driver
        await self._renew()
        adopted = await self._adopt(own=True)
        self._task = asyncio.create_task(self._keep(), name="ownership")
        return adopted

    async def stop(self, release: bool = True) -> None:
        """release: hand this replica's batches to the others at once (a graceful stop; the
        runners have stopped and written their last)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if release:
            try:
                await self.store.release_batches(self.replica)
            except StorageError as err:  # the leases run out by themselves
                log.warning("could not release this replica's batches: %s", err)

    async def _renew(self) -> None:
        now = self._clock()
        await self.store.renew_lease(self.replica, now, now + self.lease_timeout)

    async def _adopt(self, own: bool = False) -> list[BatchRecord]:
        adopted: list[BatchRecord] = []
        while True:
            found = await self.store.adopt_batches(self.replica, self._clock(), ADOPT_PER_SCAN, own=own)
            adopted += found
            if len(found) < ADOPT_PER_SCAN:
                return adopted

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except StorageError as err:
                # Leases run out if this goes on: the writes of runners are fenced meanwhile.
                log.warning("lease heartbeat failed: %s", err)
            except Exception:  # noqa: BLE001 - the heartbeat must go on
                log.exception("lease heartbeat failed")

    async def tick(self) -> None:
        """One heartbeat: renew, stop runners of batches this replica no longer owns, tell runners
        of changes others made (a cancel from another replica), adopt expired batches."""
        driver = self._driver
        assert driver is not None
        await self._renew()
        # Runners listed before the read: each one's batch was committed with this owner before
        # its runner started, so missing from `owned` means lost, not too new.
        running = driver.running()
        owned = await self.store.owned_batches(self.replica)
        # A runner whose end committed during the read is missing from `owned` too, not lost:
        # losing it would cut the cleanup after its end (result files, provider files).
        still_running = driver.running()
        for batch_id, revision in running.items():
            stored = owned.get(batch_id)
            if stored is None and batch_id not in still_running:
                continue
            if stored is None:
                log.warning("batch %s: this replica lost its lease; another replica drives it now", batch_id)
                driver.lost(batch_id)
            elif stored > revision:
                driver.changed(batch_id, stored)
        for record in await self._adopt():
            log.info("batch %s: adopted from a replica whose lease expired", record.id)
            driver.adopt(record)


class StoredProgress(SharedProgress):
    """A batch's executor answers in the metadata store, written only while this replica owns it."""

    def __init__(self, store: MetadataStore, batch_id: str, replica: str) -> None:
        self.store = store
        self.batch_id = batch_id
        self.replica = replica

    async def append(self, seq: int, writer: str, output: bytes, errors: bytes) -> None:
        try:
            await self.store.append_results(self.batch_id, seq, writer, output, errors, owner=self.replica)
        except Duplicate:  # another run stored this segment: it drives the batch now
            raise LeaseLost(self.batch_id) from None

    async def read(self) -> list[tuple[str, bytes, bytes]]:
        return await self.store.read_results(self.batch_id)

    async def delete(self) -> None:
        await self.store.delete_results(self.batch_id)
