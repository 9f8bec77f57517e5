"""Per-project quotas: running batches, stored bytes, uploads in flight and a monthly spend budget.

A project's quota is the one set through AdminService (stored, shared by every replica) or else
the config file's `project_quotas` entry; a limit left unset is no limit (uploads in flight then
fall back to --max-uploads-per-project). Both API surfaces reach these checks through the core
use cases (BatchManager.create, FileManager.upload), so gRPC and HTTP refuse alike.

Running batches and stored bytes are reserved, not only checked: the early check refuses a call
before it does any work, and the insert that takes the quota (the batch's row, the file's row) is
checked again in its own transaction (store.insert_batch / insert_file with the limit), so calls
at the same moment, on one server or on many, cannot pass a limit together. The database is the
only place every replica shares, and the insert's own transaction the only check with no window
before the row exists: SQLite's write lock (BEGIN IMMEDIATE) covers every process on the file, a
PostgreSQL advisory lock per project does at READ COMMITTED. Uploads in flight are streams held
by one server: they are counted in that server's memory (check and count with no await between),
so the limit holds per server.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping

from batchgate_server.core.errors import ResourceExhausted
from batchgate_server.domain.models import BatchRecord, FileRecord, ProjectQuota
from batchgate_server.pricing.cost import nanos_to_amount
from batchgate_server.store.errors import QuotaReached
from batchgate_server.store.ports import LedgerFilter, MetadataStore, UsageLedger

# What RetryInfo suggests: a running batch or a stored file goes away when its owner acts.
QUOTA_RETRY_AFTER = 60.0


def month_start(now: float) -> float:
    """The start of `now`'s calendar month, UTC."""
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


def next_month_start(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def exceeded(project: str, what: str, reason: str, limit: str, current: str,
             retry_after: float = QUOTA_RETRY_AFTER, **extra: str) -> ResourceExhausted:
    return ResourceExhausted(f"project {project!r} is at its quota of {what}: {current} of {limit}", reason,
                             retry_after=retry_after,
                             metadata={"project": project, "limit": limit, "current": current, **extra})


class Quotas:
    def __init__(self, store: MetadataStore, ledger: UsageLedger,
                 configured: Mapping[str, ProjectQuota] | None = None) -> None:
        self.store = store
        self.ledger = ledger
        self.configured = dict(configured or {})

    async def effective(self, project: str) -> ProjectQuota:
        stored = await self.store.get_project_quota(project)
        return stored or self.configured.get(project) or ProjectQuota(project)

    async def check_create_batch(self, project: str) -> None:
        quota = await self.effective(project)
        if quota.max_running_batches is not None:
            running = await self.store.count_unfinished_batches(project)
            if running >= quota.max_running_batches:
                raise exceeded(project, "unfinished batches", "QUOTA_RUNNING_BATCHES",
                               str(quota.max_running_batches), str(running))
        if quota.monthly_budget_nanos is not None:
            now = time.time()
            spent = (await self.ledger.totals(LedgerFilter(start=month_start(now), project=project))).cost_nanos
            if spent >= quota.monthly_budget_nanos:
                raise exceeded(project, "monthly spend (USD)", "QUOTA_MONTHLY_BUDGET",
                               nanos_to_amount(quota.monthly_budget_nanos), nanos_to_amount(spent),
                               retry_after=next_month_start(now) - now)

    async def insert_batch(self, record: BatchRecord, owner: str | None) -> None:
        """Insert a new batch under its project's limit of unfinished batches, checked atomically
        with the insert (QUOTA_RUNNING_BATCHES when it has that many already)."""
        limit = (await self.effective(record.project)).max_running_batches
        try:
            await self.store.insert_batch(record, owner=owner, max_unfinished=limit)
        except QuotaReached as reached:
            raise exceeded(record.project, "unfinished batches", "QUOTA_RUNNING_BATCHES", str(limit),
                           str(reached.current)) from None

    async def insert_file(self, record: FileRecord) -> None:
        """Insert an uploaded file under its project's stored-bytes limit, checked atomically with
        the insert (QUOTA_STORED_BYTES when this file would pass it)."""
        limit = (await self.effective(record.project)).max_stored_bytes
        try:
            await self.store.insert_file(record, max_stored_bytes=limit)
        except QuotaReached as reached:
            raise exceeded(record.project, "stored bytes", "QUOTA_STORED_BYTES", str(limit), str(reached.current),
                           upload_bytes=str(record.bytes)) from None

    async def upload_cap(self, project: str, default: int) -> int:
        """The project's uploads-in-flight cap; also refuses an upload when the project's stored
        bytes are at their limit already (the upload could only exceed it)."""
        quota = await self.effective(project)
        await self._check_stored(project, quota, 0)
        return quota.max_uploads if quota.max_uploads is not None else default

    async def check_stored_bytes(self, project: str, adding: int) -> None:
        await self._check_stored(project, await self.effective(project), adding)

    async def _check_stored(self, project: str, quota: ProjectQuota, adding: int) -> None:
        if quota.max_stored_bytes is None:
            return
        stored = await self.store.stored_bytes(project)
        if stored + adding > quota.max_stored_bytes or (adding == 0 and stored >= quota.max_stored_bytes):
            raise exceeded(project, "stored bytes", "QUOTA_STORED_BYTES", str(quota.max_stored_bytes),
                           str(stored), upload_bytes=str(adding))
