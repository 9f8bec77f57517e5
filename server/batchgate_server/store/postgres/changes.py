"""The change feed of a PostgreSQL database: LISTEN on a connection of its own.

The database announces every committed batch revision (a trigger NOTIFYs CHANNEL, see leases.py),
whichever replica wrote it. A lost connection is opened again with backoff; what was announced
meanwhile is not heard, which listeners make up for (the watch hub polls its watched batches, the
tracker's heartbeat compares revisions): a notification is a wake-up, never the only way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from batchgate_server.domain.backoff import Backoff
from batchgate_server.store.errors import StorageError
from batchgate_server.store.ports import ChangeFeed, ChangeListener
from batchgate_server.store.postgres.leases import CHANNEL

log = logging.getLogger(__name__)


class PostgresChangeFeed(ChangeFeed):
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._listeners: list[ChangeListener] = []
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None
        self._lost = asyncio.Event()

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="pg-change-feed")

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self, batch_id: str, revision: int) -> None:
        """The trigger announces every commit: nothing to do."""

    def _heard(self, conn, pid, channel, payload: str) -> None:
        batch_id, _, revision = payload.rpartition(" ")
        try:
            number = int(revision)
        except ValueError:
            return
        for listener in list(self._listeners):
            try:
                listener(batch_id, number)
            except Exception:  # noqa: BLE001 - one listener's bug must not deafen the others
                log.exception("change listener failed")

    async def _listen(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            try:
                self._conn = await self._connect()
                self._lost.clear()
                self._conn.add_termination_listener(lambda _conn: self._lost.set())
                await self._conn.add_listener(CHANNEL, self._heard)
                backoff.reset()
                await self._lost.wait()
            except (StorageError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
                log.warning("change feed: %s; listening again shortly", err)
            await self._close_connection()
            await asyncio.sleep(backoff.next())

    async def _close_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=2)
            except Exception:  # noqa: BLE001 - a dead connection has nothing to close
                conn.terminate()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close_connection()
