"""Many watchers and pollers of one batch receive the same state: each API surface converts a state
once (to a proto message, to JSON …) and reuses the result while it is recent."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from batchgate_server.domain.models import BatchRecord

T = TypeVar("T")

DEFAULT_SIZE = 256


class RevisionCache(Generic[T]):
    """`convert(record)` per (batch id, revision), the last `size` of them kept."""

    def __init__(self, convert: Callable[[BatchRecord], T], size: int = DEFAULT_SIZE) -> None:
        self._convert = convert
        self._size = size
        self._items: OrderedDict[tuple[str, int], T] = OrderedDict()

    def __call__(self, record: BatchRecord) -> T:
        key = (record.id, record.revision)
        value = self._items.get(key)
        if value is None:
            value = self._convert(record)
            self._items[key] = value
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


class LatestStates:
    """The newest state read of each of the last `size` batches: what a poller's next read of one
    compares against (BatchManager.get's `known`), so that an unchanged batch is not decoded again.
    The states are only read (converted), never changed."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[str, BatchRecord] = OrderedDict()

    def get(self, batch_id: str) -> BatchRecord | None:
        return self._items.get(batch_id)

    def put(self, record: BatchRecord) -> None:
        self._items[record.id] = record
        self._items.move_to_end(record.id)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
