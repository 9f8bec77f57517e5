"""The change feed of a SQLite database: in-process only.

SQLite has no way to tell another process that a row changed. Servers in one process on one
database file (tests of several replicas in one process) share one feed per file; separate
processes on one file hear nothing here and rely on the watch hub's poll of watched batches.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
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


# Batches whose newest revision is remembered (4096 ids of about 80 bytes each).
LATEST_REVISIONS = 4096


class LatestRevisions:
    """The newest revision heard of each of the last LATEST_REVISIONS batches: from the feed (a
    write announces its revision after its commit, before it returns) and from reads that ran
    with no other coroutine between them and the feed. With no other process writing the
    database, a batch whose remembered revision is the one a reader holds has not changed since
    (an absent id only costs a read). Revisions only grow here: a late or repeated one changes
    nothing."""

    def __init__(self, size: int = LATEST_REVISIONS) -> None:
        self._size = size
        self._items: OrderedDict[str, int] = OrderedDict()

    def get(self, batch_id: str) -> int | None:
        return self._items.get(batch_id)

    def heard(self, batch_id: str, revision: int) -> None:
        if revision > self._items.get(batch_id, 0):
            self._items[batch_id] = revision
            self._items.move_to_end(batch_id)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
