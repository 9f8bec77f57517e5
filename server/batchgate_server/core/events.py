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
        """The tracker took `rec` on (a new batch, or an unfinished one after a restart)."""

    def changed(self, before: BatchRecord, after: BatchRecord, ledger: dict[str, Any] | None) -> None:
        """A write committed. `ledger`: the usage-ledger row that same transaction wrote (once per
        batch, at its end), else None."""

    def polled(self, rec: BatchRecord) -> None:
        """The provider was asked how the batch is doing."""

    def released(self, rec: BatchRecord) -> None:
        """The tracker stopped driving `rec` (it ended, or the server is stopping)."""
