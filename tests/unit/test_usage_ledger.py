"""The usage ledger's aggregate queries (store/sqlite/ledger.py) and the cost_nanos migration."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal

import pytest

from batchgate_server.pricing.cost import amount_to_nanos, nanos_to_amount
from batchgate_server.store.ports import Dimension, LedgerFilter
from batchgate_server.store.sqlite.ledger import SqliteUsageLedger
from batchgate_server.store.sqlite.metadata import MIGRATIONS, SqliteMetadataStore

COLUMNS = ("batch_id", "project", "api_key_id", "model", "provider", "deployment_id", "created_at", "ended_at",
           "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost_status", "cost_amount",
           "metadata", "usage_by_model")


def row(batch_id: str, *, project: str = "p", key: str = "k", model: str = "m", provider: str = "openai",
        ended_at: float = 100.0, tokens: tuple[int, int, int, int] = (10, 2, 5, 1), amount: str = "0.1",
        status: str = "known", metadata: dict | None = None) -> dict:
    return dict(zip(COLUMNS, (batch_id, project, key, model, provider, "dep", ended_at - 1, ended_at, *tokens,
                              status, amount, json.dumps(metadata or {}), "{}")))


async def insert(store: SqliteMetadataStore, *rows: dict) -> None:
    for r in rows:
        r = dict(r, cost_nanos=amount_to_nanos(r["cost_amount"]) if r["cost_status"] == "known" else None)
        await store.db.execute(f"INSERT INTO usage_ledger({','.join(r)}) VALUES ({','.join('?' * len(r))})",
                               tuple(r.values()))


@pytest.fixture
async def store(tmp_path):
    s = await SqliteMetadataStore.open(tmp_path / "db.sqlite3")
    try:
        yield s
    finally:
        await s.close()


def test_nanos_round_trip():
    for amount in ("0", "0.000000001", "0.1", "12.5", "0.002962575", "123456789.123456789"):
        assert nanos_to_amount(amount_to_nanos(amount)) == amount
    assert amount_to_nanos("0.0000000001") is None  # finer than a nano-dollar: not representable
    assert amount_to_nanos("") is None and amount_to_nanos("-1") is None and amount_to_nanos("NaN") is None


async def test_migration_backfills_cost_nanos_exactly(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:  # the schema as shipped before cost_nanos
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    amounts = {"a": ("known", "0.002962575"), "b": ("known", "12.5"), "c": ("known", "0"), "d": ("unknown", ""),
               "e": ("known", "100"), "f": ("known", "0.0000000001"), "g": ("known", "9007199254.740993001")}
    for batch_id, (status, amount) in amounts.items():
        r = row(batch_id, status=status, amount=amount)
        db.execute(f"INSERT INTO usage_ledger({','.join(r)}) VALUES ({','.join('?' * len(r))})", tuple(r.values()))
    db.commit()
    db.close()

    store = await SqliteMetadataStore.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        async with store.db.execute("SELECT batch_id, cost_nanos FROM usage_ledger ORDER BY batch_id") as cur:
            got = {r[0]: r[1] for r in await cur.fetchall()}
    finally:
        await store.close()
    # Digit by digit, no floating point: g would lose its last digits through a REAL.
    assert got == {"a": 2_962_575, "b": 12_500_000_000, "c": 0, "d": None, "e": 100_000_000_000,
                   "f": None, "g": 9_007_199_254_740_993_001}
    for batch_id, (_, amount) in amounts.items():
        assert got[batch_id] == (amount_to_nanos(amount) if amounts[batch_id][0] == "known" else None)


async def test_sums_are_exact_and_unknown_costs_are_counted_not_zeroed(store):
    # Ten batches of $0.1: a float sum would give 0.9999999999999999.
    await insert(store, *[row(f"b{i}", amount="0.1") for i in range(10)],
                 row("u1", status="unknown", amount=""), row("u2", status="unknown", amount=""))
    totals = await SqliteUsageLedger(store).totals(LedgerFilter())
    assert totals.batch_count == 12 and totals.unknown_cost == 2
    assert nanos_to_amount(totals.cost_nanos) == "1"
    # Tokens of unknown-cost batches still count.
    assert (totals.input_tokens, totals.cached_tokens, totals.output_tokens, totals.reasoning_tokens) == (
        120, 24, 60, 12)


async def test_large_sums_stay_integers(store):
    big = 2**53 + 1  # not representable as a double
    await insert(store, row("a", tokens=(big, 0, 0, 0), amount="99999999.999999999"),
                 row("b", tokens=(1, 0, 0, 0), amount="0.000000001"))
    totals = await SqliteUsageLedger(store).totals(LedgerFilter())
    assert totals.input_tokens == big + 1
    assert Decimal(nanos_to_amount(totals.cost_nanos)) == Decimal("100000000")


async def test_filters_and_half_open_time_range(store):
    await insert(store, row("a", ended_at=100.0), row("b", ended_at=200.0), row("c", ended_at=300.0, project="q"),
                 row("d", ended_at=150.0, model="other"), row("e", ended_at=160.0, provider="anthropic"))
    ledger = SqliteUsageLedger(store)

    async def count(**kw) -> int:
        return (await ledger.totals(LedgerFilter(**kw))).batch_count

    assert await count() == 5
    assert await count(start=100.0, end=200.0) == 3  # a, d, e: start included, end excluded
    assert await count(start=200.0) == 2
    assert await count(end=100.0) == 0
    assert await count(project="q") == 1 and await count(project="nobody") == 0
    assert await count(model="other") == 1 and await count(provider="anthropic") == 1
    assert await count(as_of=2) == 2  # the first two rows inserted


async def test_grouping_metadata_with_absent_key_and_keyset_pages(store):
    await insert(store,
                 row("a", project="p1", metadata={"team": "search"}, amount="1"),
                 row("b", project="p1", metadata={"team": "ads"}, amount="2"),
                 row("c", project="p1", metadata={}, amount="4"),
                 row("d", project="p2", metadata={"team": "search"}, amount="8"),
                 row("e", project="p2", metadata={"team": "search", "x": "y"}, amount="16"),
                 row("f", project="p2", metadata={"team": ""}, amount="32"))
    ledger = SqliteUsageLedger(store)
    dims = [Dimension("project"), Dimension("metadata", "team")]
    everything = await ledger.aggregate(LedgerFilter(), dims, limit=100)
    got = [(g.group, g.batch_count, nanos_to_amount(g.cost_nanos)) for g in everything]
    assert got == [
        ({"project": "p1"}, 1, "4"),  # no "team" key: its own group, key absent
        ({"project": "p1", "metadata.team": "ads"}, 1, "2"),
        ({"project": "p1", "metadata.team": "search"}, 1, "1"),
        ({"project": "p2", "metadata.team": ""}, 1, "32"),  # an empty value is not an absent key
        ({"project": "p2", "metadata.team": "search"}, 2, "24"),
    ]
    # Page through two at a time with the keyset cursor: the same groups, in order, once each.
    pages, after = [], None
    while True:
        page = await ledger.aggregate(LedgerFilter(), dims, limit=2, after=after)
        if not page:
            break
        pages += [g.group for g in page]
        after = page[-1].sort_key
    assert pages == [g.group for g in everything]


async def test_metadata_keys_needing_json_path_quoting(store):
    odd = 'we.ird"key[0]'
    await insert(store, row("a", metadata={odd: "v1"}), row("b", metadata={odd: "v1"}), row("c"))
    groups = await SqliteUsageLedger(store).aggregate(LedgerFilter(), [Dimension("metadata", odd)], limit=10)
    assert [(g.group, g.batch_count) for g in groups] == [({}, 1), ({f"metadata.{odd}": "v1"}, 2)]


async def test_no_dimensions_is_one_row_or_none(store):
    ledger = SqliteUsageLedger(store)
    assert await ledger.aggregate(LedgerFilter(), [], limit=10) == []
    await insert(store, row("a"), row("b"))
    [only] = await ledger.aggregate(LedgerFilter(), [], limit=10)
    assert only.group == {} and only.batch_count == 2 and nanos_to_amount(only.cost_nanos) == "0.2"
