"""The change feed of a SQLite database: in-process only.

SQLite has no way to tell another process that a row changed. Servers in one process on one
database file (tests of several replicas in one process) share one feed per file; separate
processes on one file hear nothing here and rely on the watch hub's poll of watched batches.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, ClassVar

from batchgate_server.store.ports import ChangeFeed, ChangeListener

log = logging.getLogger(__name__)


class LocalChangeFeed(ChangeFeed):
    _by_database: ClassVar[dict[str, "LocalChangeFeed"]] = {}

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []

    @classmethod
    def for_database(cls, path: Path) -> "LocalChangeFeed":
        key = os.path.realpath(path)
        feed = cls._by_database.get(key)
        if feed is None:
            feed = cls._by_database[key] = cls()
        return feed

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self, batch_id: str, revision: int) -> None:
        for listener in list(self._listeners):
            try:
                listener(batch_id, revision)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop a committed write
                log.exception("change listener failed")
