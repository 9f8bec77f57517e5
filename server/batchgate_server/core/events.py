"""What the tracker tells observers about the batches it drives.

Core calls these hooks and knows nothing of who listens: app.py wires in the metrics
(observability/metrics.py) when they are on, and this no-op base otherwise. A hook must be
cheap and must not raise: it runs inside the runner, right after a write has committed.
"""

from __future__ import annotations

from typing import Any

from batchgate_server.domain.models import BatchRecord


class BatchEvents:
    def adopted(self, rec: BatchRecord) -> None:
        """The tracker took `rec` on (a new batch, or an unfinished one after a restart). Runs in
        the context the batch's runner task will run in: a context variable set here is the
        runner's alone."""

    def changed(self, before: BatchRecord, after: BatchRecord, ledger: dict[str, Any] | None) -> None:
        """A write committed. `ledger`: the usage-ledger row that same transaction wrote (once per
        batch, at its end), else None."""

    def polled(self, rec: BatchRecord) -> None:
        """The provider was asked how the batch is doing."""

    def released(self, rec: BatchRecord) -> None:
        """The tracker stopped driving `rec` (it ended, or the server is stopping)."""


class EventFanout(BatchEvents):
    """Several observers (metrics, traces) as one."""

    def __init__(self, observers: list[BatchEvents]) -> None:
        self.observers = observers

    def adopted(self, rec: BatchRecord) -> None:
        for o in self.observers:
            o.adopted(rec)

    def changed(self, before: BatchRecord, after: BatchRecord, ledger: dict[str, Any] | None) -> None:
        for o in self.observers:
            o.changed(before, after, ledger)

    def polled(self, rec: BatchRecord) -> None:
        for o in self.observers:
            o.polled(rec)

    def released(self, rec: BatchRecord) -> None:
        for o in self.observers:
            o.released(rec)


class ParentsOnly(BatchEvents):
    """`inner`, told about batches only, not about the shards a sharded batch runs as
    (domain/shards.py): a caller's batch is counted once however many jobs it takes. A shard's
    ledger row is passed on (tokens and cost are billed per shard) as a change without a
    status change."""

    def __init__(self, inner: BatchEvents) -> None:
        self.inner = inner

    def adopted(self, rec: BatchRecord) -> None:
        if not rec.parent_id:
            self.inner.adopted(rec)

    def changed(self, before: BatchRecord, after: BatchRecord, ledger: dict[str, Any] | None) -> None:
        if not after.parent_id:
            self.inner.changed(before, after, ledger)
        elif ledger is not None:
            self.inner.changed(after, after, ledger)

    def polled(self, rec: BatchRecord) -> None:
        if not rec.parent_id:
            self.inner.polled(rec)

    def released(self, rec: BatchRecord) -> None:
        if not rec.parent_id:
            self.inner.released(rec)
