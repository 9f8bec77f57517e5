"""Aggregate queries over the usage ledger (one row per ended batch, insert-only).

Sums are computed in SQL: tokens as integers and known costs as integer nano-dollars
(`cost_nanos`), so a sum over any number of batches is exact. A row whose cost is not
known (status "unknown", or an amount that is not a whole number of nano-dollars) is
counted in `unknown_cost`, never added as zero.

Pages are keyset-paginated on the group values. Rows are only ever inserted, with growing
rowids, so bounding a query by the highest rowid seen on its first page (`as_of`) gives
every later page the same snapshot of the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batchgate_server.store.metadata import MetadataStore

# Group dimensions: ledger column -> name in UsageGroup.group.
COLUMNS = {"project": "project", "api_key_id": "api_key_id", "model": "model", "provider": "provider"}
METADATA = "metadata"

_KNOWN = "cost_status = 'known' AND cost_nanos IS NOT NULL"
# sum() over INTEGER columns stays an exact integer (total() would return a REAL).
_SUMS = (
    "count(*) AS batch_count, coalesce(sum(input_tokens), 0) AS input_tokens,"
    " coalesce(sum(cached_tokens), 0) AS cached_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,"
    " coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,"
    f" coalesce(sum(CASE WHEN {_KNOWN} THEN cost_nanos END), 0) AS cost_nanos,"
    f" coalesce(sum(CASE WHEN {_KNOWN} THEN 0 ELSE 1 END), 0) AS unknown_cost"
)


@dataclass(frozen=True)
class Dimension:
    """One grouping dimension: a ledger column ("project", "api_key_id", "model", "provider")
    or "metadata" with the metadata key whose value groups."""

    kind: str
    metadata_key: str = ""

    @property
    def name(self) -> str:
        return f"metadata.{self.metadata_key}" if self.kind == METADATA else COLUMNS[self.kind]


@dataclass(frozen=True)
class LedgerFilter:
    start: float | None = None  # ended_at >= start
    end: float | None = None  # ended_at < end
    project: str | None = None  # None: every project
    model: str = ""
    provider: str = ""
    as_of: int | None = None  # only rows with rowid <= as_of


@dataclass
class UsageGroup:
    group: dict[str, str] = field(default_factory=dict)
    batch_count: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0  # sum of the known costs, in 1e-9 USD
    unknown_cost: int = 0  # batches whose cost is unknown (not in cost_nanos)
    # The keyset cursor of this group (JSON-serialisable), for the next page.
    sort_key: list[Any] = field(default_factory=list)


def _where(f: LedgerFilter) -> tuple[str, list[Any]]:
    clauses, args = ["1=1"], []
    if f.start is not None:
        clauses.append("ended_at >= ?")
        args.append(f.start)
    if f.end is not None:
        clauses.append("ended_at < ?")
        args.append(f.end)
    if f.project is not None:
        clauses.append("project = ?")
        args.append(f.project)
    if f.model:
        clauses.append("model = ?")
        args.append(f.model)
    if f.provider:
        clauses.append("provider = ?")
        args.append(f.provider)
    if f.as_of is not None:
        clauses.append("rowid <= ?")
        args.append(f.as_of)
    return " AND ".join(clauses), args


def _group(row: Any, offset: int) -> UsageGroup:
    return UsageGroup(
        batch_count=int(row[offset]), input_tokens=int(row[offset + 1]), cached_tokens=int(row[offset + 2]),
        output_tokens=int(row[offset + 3]), reasoning_tokens=int(row[offset + 4]),
        cost_nanos=int(row[offset + 5]), unknown_cost=int(row[offset + 6]))


class UsageLedger:
    """Reads through the store's reader pool: only committed rows (a batch's end and its ledger
    row are committed together), and every row committed before the query."""

    def __init__(self, store: MetadataStore) -> None:
        self.readers = store.readers

    async def high_water(self) -> int:
        """The newest ledger rowid: what `LedgerFilter.as_of` pins a multi-page query to."""
        row = await self.readers.fetchone("SELECT coalesce(max(rowid), 0) FROM usage_ledger")
        return int(row[0])

    async def totals(self, f: LedgerFilter) -> UsageGroup:
        where, args = _where(f)
        return _group(await self.readers.fetchone(f"SELECT {_SUMS} FROM usage_ledger WHERE {where}", args), 0)

    async def aggregate(self, f: LedgerFilter, dims: Sequence[Dimension], limit: int,
                        after: Sequence[Any] | None = None) -> list[UsageGroup]:
        """Groups in ascending order of their values, at most `limit`, after the cursor `after`
        (a previous group's sort_key). Without dims: the one group of everything, if any."""
        if not dims:
            total = await self.totals(f)
            return [total] if total.batch_count and not after else []
        select, select_args, sort = [], [], []
        for i, dim in enumerate(dims):
            if dim.kind == METADATA:
                # Exact key match through json_each: no JSON-path quoting of arbitrary keys.
                select.append(f"(SELECT value FROM json_each(usage_ledger.metadata) WHERE key = ?) AS d{i}")
                select_args.append(dim.metadata_key)
                # Absent key first (its own group), then values in order.
                sort += [f"(d{i} IS NOT NULL)", f"coalesce(d{i}, '')"]
            else:
                select.append(f"{COLUMNS[dim.kind]} AS d{i}")
                sort.append(f"d{i}")
        where, where_args = _where(f)
        groups = ", ".join(f"d{i}" for i in range(len(dims)))
        inner = f"SELECT {', '.join(select)}, {_SUMS} FROM usage_ledger WHERE {where} GROUP BY {groups}"
        sql = f"SELECT *, {', '.join(sort)} FROM ({inner})"
        args: list[Any] = [*select_args, *where_args]
        if after:
            sql += f" WHERE ({', '.join(sort)}) > ({', '.join('?' * len(sort))})"
            args += list(after)
        sql += f" ORDER BY {', '.join(sort)} LIMIT ?"
        args.append(limit)
        out = []
        for row in await self.readers.fetchall(sql, args):
            g = _group(row, len(dims))
            for i, dim in enumerate(dims):
                if row[i] is not None:
                    g.group[dim.name] = str(row[i])
            g.sort_key = list(row[len(dims) + 7:])
            out.append(g)
        return out
