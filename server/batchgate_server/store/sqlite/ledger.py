"""The usage ledger on SQLite (store.ports.UsageLedger): aggregate queries over the
`usage_ledger` table (one row per ended batch, insert-only).

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
from typing import Any

from batchgate_server.store.ports import LEDGER_COLUMNS, METADATA, Dimension, LedgerFilter, UsageGroup, UsageLedger
from batchgate_server.store.sqlite.metadata import SqliteMetadataStore

_KNOWN = "cost_status = 'known' AND cost_nanos IS NOT NULL"
# sum() over INTEGER columns stays an exact integer (total() would return a REAL).
# A sharded batch has a row per shard (domain/shards.py), each naming its parent: counted once
# (in unknown_cost too).
_SUMS = (
    "count(DISTINCT coalesce(parent_batch_id, batch_id)) AS batch_count, coalesce(sum(input_tokens), 0) AS input_tokens,"
    " coalesce(sum(cached_tokens), 0) AS cached_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,"
    " coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,"
    f" coalesce(sum(CASE WHEN {_KNOWN} THEN cost_nanos END), 0) AS cost_nanos,"
    f" count(DISTINCT CASE WHEN {_KNOWN} THEN NULL ELSE coalesce(parent_batch_id, batch_id) END) AS unknown_cost,"
    " coalesce(sum(cache_creation_tokens), 0) AS cache_creation_tokens,"
    " coalesce(sum(cache_creation_1h_tokens), 0) AS cache_creation_1h_tokens"
)


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
        cost_nanos=int(row[offset + 5]), unknown_cost=int(row[offset + 6]),
        cache_creation_tokens=int(row[offset + 7]), cache_creation_1h_tokens=int(row[offset + 8]))


class SqliteUsageLedger(UsageLedger):
    """Reads through the store's reader pool: only committed rows (a batch's end and its ledger
    row are committed together), and every row committed before the query."""

    def __init__(self, store: SqliteMetadataStore) -> None:
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
                select.append(f"{LEDGER_COLUMNS[dim.kind]} AS d{i}")
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
            g.sort_key = list(row[len(dims) + 9:])  # after the sums
            out.append(g)
        return out
