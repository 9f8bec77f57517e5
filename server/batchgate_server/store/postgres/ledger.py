"""Aggregate queries over the PostgreSQL usage ledger: the same groups, order, cursors and exact
sums as the SQLite ledger (store/sqlite/ledger.py), the contract of store/ports.py UsageLedger.

Sums are exact: PostgreSQL's sum() over bigint and numeric columns is numeric (never a float, never
an overflow); known costs are summed in integer nano-dollars (`cost_nanos`). Text compares in byte
order (`COLLATE "C"`, and metadata as UTF-8 bytea), as SQLite's.

`as_of` pins a multi-page query to one snapshot of the ledger by `seq`: rows get their seq under
an advisory lock held to their commit (metadata.py), so every row with a seq up to the highest
committed one is committed already, and a row committing later has a higher seq.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from batchgate_server.store.ports import LEDGER_COLUMNS, METADATA, Dimension, LedgerFilter, UsageGroup, UsageLedger
from batchgate_server.store.postgres.metadata import Params, PostgresMetadataStore, text_param, utf8

_KNOWN = "cost_status = 'known' AND cost_nanos IS NOT NULL"
# A sharded batch has a row per shard (domain/shards.py), each naming its parent: counted once
# (in unknown_cost too).
_SUMS = (
    "count(DISTINCT coalesce(l.parent_batch_id, l.batch_id)) AS batch_count, coalesce(sum(input_tokens), 0) AS input_tokens,"
    " coalesce(sum(cached_tokens), 0) AS cached_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,"
    " coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,"
    f" coalesce(sum(cost_nanos) FILTER (WHERE {_KNOWN}), 0) AS cost_nanos,"
    f" count(DISTINCT coalesce(l.parent_batch_id, l.batch_id)) FILTER (WHERE NOT ({_KNOWN})) AS unknown_cost,"
    " coalesce(sum(cache_creation_tokens), 0) AS cache_creation_tokens,"
    " coalesce(sum(cache_creation_1h_tokens), 0) AS cache_creation_1h_tokens"
)
_SUM_NAMES = ("batch_count", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost_nanos",
              "unknown_cost", "cache_creation_tokens", "cache_creation_1h_tokens")


def _where(f: LedgerFilter, p: Params) -> str:
    clauses = ["TRUE"]
    if f.start is not None:
        clauses.append(f"l.ended_at >= {p(float(f.start))}")
    if f.end is not None:
        clauses.append(f"l.ended_at < {p(float(f.end))}")
    if f.project is not None:
        clauses.append(f"l.project = {p(text_param(f.project))}")
    if f.model:
        clauses.append(f"l.model = {p(text_param(f.model))}")
    if f.provider:
        clauses.append(f"l.provider = {p(text_param(f.provider))}")
    if f.as_of is not None:
        clauses.append(f"l.seq <= {p(f.as_of)}")
    return " AND ".join(clauses)


def _group(row: asyncpg.Record) -> UsageGroup:
    return UsageGroup(**{name: int(row[name]) for name in _SUM_NAMES})


class PostgresUsageLedger(UsageLedger):
    """Reads through the store's pool: only committed rows (a batch's end and its ledger row are
    committed together), and every row committed before the query."""

    def __init__(self, store: PostgresMetadataStore) -> None:
        self.store = store

    async def high_water(self) -> int:
        """The newest ledger seq: what `LedgerFilter.as_of` pins a multi-page query to."""
        row = await self.store._fetchrow("SELECT coalesce(max(seq), 0) FROM usage_ledger")
        return int(row[0])

    async def totals(self, f: LedgerFilter) -> UsageGroup:
        p = Params()
        where = _where(f, p)
        return _group(await self.store._fetchrow(f"SELECT {_SUMS} FROM usage_ledger l WHERE {where}", *p.values))

    async def aggregate(self, f: LedgerFilter, dims: Sequence[Dimension], limit: int,
                        after: Sequence[Any] | None = None) -> list[UsageGroup]:
        if not dims:
            total = await self.totals(f)
            return [total] if total.batch_count and not after else []
        p = Params()
        select, joins, sort, cursor = [], [], [], []
        for i, dim in enumerate(dims):
            if dim.kind == METADATA:
                # An exact key match; absent key first (its own group), then values in byte order.
                joins.append(f"LEFT JOIN usage_ledger_metadata m{i} ON m{i}.batch_id = l.batch_id"
                             f" AND m{i}.key = {p(utf8(dim.metadata_key))}")
                select.append(f"m{i}.value AS d{i}")
                sort += [f"(d{i} IS NOT NULL)::int", f"coalesce(d{i}, ''::bytea)"]
                cursor += ["int", "bytea"]
            else:
                select.append(f"l.{LEDGER_COLUMNS[dim.kind]} AS d{i}")
                sort.append(f"d{i}")
                cursor.append("text")
        where = _where(f, p)
        groups = ", ".join(f"d{i}" for i in range(len(dims)))
        inner = (f"SELECT {', '.join(select)}, {_SUMS} FROM usage_ledger l {' '.join(joins)}"
                 f" WHERE {where} GROUP BY {groups}")
        keys = ", ".join(f"{s} AS k{j}" for j, s in enumerate(sort))
        sql = f"SELECT *, {keys} FROM ({inner}) g"
        if after:
            if len(after) != len(sort):
                return []
            values = [_cursor_value(kind, value) for kind, value in zip(cursor, after)]
            sql += f" WHERE ({', '.join(sort)}) > ({', '.join(f'{p(v)}::{k}' for k, v in zip(cursor, values))})"
        sql += f" ORDER BY {', '.join(f'k{j}' for j in range(len(sort)))} LIMIT {p(limit)}"
        out = []
        for row in await self.store._fetch(sql, *p.values):
            g = _group(row)
            for i, dim in enumerate(dims):
                value = row[f"d{i}"]
                if value is not None:
                    g.group[dim.name] = _text(value)
            # JSON-serialisable for the page token: bytes as their text.
            g.sort_key = [_text(row[f"k{j}"]) if kind == "bytea" else row[f"k{j}"] for j, kind in enumerate(cursor)]
            out.append(g)
        return out


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", "surrogatepass") if isinstance(value, (bytes, memoryview)) else str(value)


def _cursor_value(kind: str, value: Any) -> Any:
    if kind == "bytea":
        return utf8(str(value))
    if kind == "int":
        return int(value)
    return text_param(str(value))
