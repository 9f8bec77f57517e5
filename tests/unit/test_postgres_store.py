"""What only PostgreSQL has to show: several servers (store instances, each its own pool) on one
database — compare-and-set across them, the ledger written once, the migration lock — and the
driver's failures arriving as the neutral errors (a killed connection, a full disk, no server)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest

from batchgate_server.domain.models import TERMINAL_STATUSES, BatchStatus
from batchgate_server.store.errors import RevisionConflict, StorageFull, StorageUnavailable
from batchgate_server.store.ports import LedgerFilter
from batchgate_server.store.postgres import PostgresMetadataStore, PostgresUsageLedger, locks
from batchgate_server.store.postgres.metadata import _insert_ledger_row
from batchgate_server.store.postgres.migrations import MIGRATIONS, TERMINAL
from tests.backends_pg import PostgresServer
from tests.storage_full import SmallDisk
from tests.contract.test_metadata_store_contract import batch_record as batch
from tests.contract.test_metadata_store_contract import file_record as result_file
from tests.contract.test_metadata_store_contract import ledger_row


async def poll_until(probe, what: str, timeout: float = 30.0):
    """Await `probe()` until it returns something truthy (PostgreSQL's own views tell when a
    session waits; there is no event to wait on from here)."""
    deadline = time.monotonic() + timeout
    while not (found := await probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return found


@pytest.fixture
async def admin(postgres_url: str):
    """A plain connection to the test's database, outside any store."""
    conn = await asyncpg.connect(postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


async def waiting_store_sessions(admin: asyncpg.Connection, wait: str) -> list[int]:
    """Pids of the stores' sessions on this database blocked on a lock of kind `wait`."""
    return [r["pid"] for r in await admin.fetch(
        "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted"
        " WHERE a.datname = current_database() AND a.application_name = 'batchgate' AND l.locktype = $1", wait)]


async def test_two_replicas_updating_one_batch_exactly_one_wins(open_postgres_store):
    first, second = await open_postgres_store(), await open_postgres_store()
    await first.insert_batch(batch("batch_1"))
    for round_ in range(20):
        mine, theirs = await first.get_batch("batch_1"), await second.get_batch("batch_1")
        assert mine.revision == theirs.revision == round_ + 1
        mine.status, theirs.status = BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING
        results = await asyncio.gather(first.update_batch(mine), second.update_batch(theirs),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["BatchRecord", "RevisionConflict"], results
        stored = await first.get_batch("batch_1")
        winner = mine if results[0] is mine else theirs
        assert stored.revision == round_ + 2 and stored.status is winner.status


async def test_two_replicas_ending_one_batch_write_one_ledger_row(open_postgres_store):
    stores = [await open_postgres_store() for _ in range(4)]
    for i in range(10):
        await stores[0].insert_batch(batch(f"batch_{i}"))
    for i in range(10):
        copies = [await s.get_batch(f"batch_{i}") for s in stores]
        for n, b in enumerate(copies):
            b.status = BatchStatus.COMPLETED
            b.output_file_id = f"file-out-{i}-{n}"
        results = await asyncio.gather(*(
            s.update_batch(b, extra_files=[result_file(b.output_file_id)],
                           ledger=ledger_row(b.id, tokens=(n, 0, 0, 0)))
            for n, (s, b) in enumerate(zip(stores, copies))), return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in results) == 1, results
        assert all(isinstance(r, RevisionConflict) for r in results if isinstance(r, Exception))
    ledger = PostgresUsageLedger(stores[1])
    assert (await ledger.totals(LedgerFilter())).batch_count == 10
    # Only the winner's result file was recorded: the losers' transactions left nothing.
    winners = {(await stores[2].get_batch(f"batch_{i}")).output_file_id for i in range(10)}
    assert await stores[3].all_file_ids() == winners


async def test_ledger_rows_commit_in_the_order_of_their_seq(open_postgres_store, admin):
    """A multi-page usage query pins its pages to high_water(): no row may commit later with a seq
    at or below it. A second ledger row waits while the first's transaction is open."""
    store = await open_postgres_store()
    ledger = PostgresUsageLedger(store)
    first, second = batch("batch_1"), batch("batch_2")
    for b in (first, second):
        await store.insert_batch(b)
    async with store.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await _insert_ledger_row(conn, ledger_row(first.id))  # seq 1, not committed yet
        second.status = BatchStatus.COMPLETED
        ending = asyncio.create_task(store.update_batch(second, ledger=ledger_row(second.id)))
        await poll_until(lambda: waiting_store_sessions(admin, "advisory"), "the second row to wait")
        assert await ledger.high_water() == 0 and not ending.done()
        await tx.commit()
    await ending
    rows = await admin.fetch("SELECT batch_id, seq FROM usage_ledger ORDER BY seq")
    assert [r["batch_id"] for r in rows] == ["batch_1", "batch_2"]
    assert await ledger.high_water() == rows[-1]["seq"]


async def test_replicas_opening_an_empty_database_at_once_migrate_it_once(open_postgres_store, admin):
    stores = await asyncio.gather(*(open_postgres_store() for _ in range(6)))
    assert {await s.schema_version() for s in stores} == {len(MIGRATIONS)}
    rows = await admin.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    await stores[0].insert_batch(batch("batch_1"))
    assert (await stores[5].get_batch("batch_1")).id == "batch_1"


async def test_a_server_waits_for_another_one_migrating(open_postgres_store, admin):
    await admin.execute("SELECT pg_advisory_lock($1, $2)", locks.NAMESPACE, locks.MIGRATIONS)
    opening = asyncio.create_task(open_postgres_store())
    await poll_until(lambda: waiting_store_sessions(admin, "advisory"), "the store to wait for the lock")
    assert await admin.fetchval("SELECT to_regclass('batches')") is None, "nothing migrated under another's lock"
    await admin.execute("SELECT pg_advisory_unlock($1, $2)", locks.NAMESPACE, locks.MIGRATIONS)
    store = await opening
    assert await store.schema_version() == len(MIGRATIONS)


async def test_a_newer_schema_is_refused(open_postgres_store, admin):
    await (await open_postgres_store()).close()
    await admin.execute("INSERT INTO schema_migrations(version, applied_at) VALUES ($1, 0)", len(MIGRATIONS) + 1)
    with pytest.raises(RuntimeError, match="newer than this server"):
        await open_postgres_store()


async def test_a_read_after_a_write_on_another_replica_sees_it(open_postgres_store):
    writer, reader = await open_postgres_store(), await open_postgres_store()
    for i in range(50):
        b = batch(f"batch_{i}")
        await writer.insert_batch(b)
        b.status = BatchStatus.IN_PROGRESS
        await writer.update_batch(b)
        assert (await reader.get_batch(b.id)).revision == 2


async def test_a_connection_killed_mid_transaction_is_unavailable_then_the_pool_recovers(
        open_postgres_store, admin, postgres_server):
    store = await open_postgres_store()
    b = batch("batch_1")
    await store.insert_batch(b)
    async with admin.transaction():  # hold the batch's row so the terminal transaction stops inside
        await admin.execute("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", b.id)
        b.status = BatchStatus.COMPLETED
        ending = asyncio.create_task(store.update_batch(b, extra_files=[result_file("file-out")],
                                                        ledger=ledger_row(b.id)))
        [pid] = await poll_until(lambda: waiting_store_sessions(admin, "transactionid"), "the update to wait")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(StorageUnavailable):
            await ending
    assert b.revision == 1, "the failed update left the record as it was"
    assert await store.get_file("file-out") is None and (await store.get_batch(b.id)).revision == 1
    await store.update_batch(b, extra_files=[result_file("file-out")], ledger=ledger_row(b.id))
    assert (await PostgresUsageLedger(store).totals(LedgerFilter())).batch_count == 1
    # Every pooled connection killed while idle (a database restart): the next calls still work.
    assert postgres_server.terminate_connections(store.url) >= 1
    assert (await store.get_batch(b.id)).status is BatchStatus.COMPLETED
    await store.insert_batch(batch("batch_2"))
    assert {x.id for x in await store.list_batches(None, (), 10, None)} == {"batch_1", "batch_2"}


async def test_an_unreachable_database_is_unavailable():
    with pytest.raises(StorageUnavailable):
        await PostgresMetadataStore.open("postgresql://postgres@127.0.0.1:1/nothing")


async def test_a_full_disk_is_storage_full_and_reads_still_work(postgres_server: PostgresServer):
    """The database's tablespace on a small tmpfs, filled to the last byte."""
    mount = Path(tempfile.mkdtemp(prefix="batchgate-pg-disk-"))
    os.chmod(mount, 0o755)  # the server (as postgres) reaches the tablespace through it
    with SmallDisk(mount, size="64m") as disk:
        location = disk.root / "tablespace"
        location.mkdir()
        postgres_server.chown_to_server(location)
        postgres_server.psql(f"CREATE TABLESPACE small LOCATION '{location}'")
        url = postgres_server.create_database(tablespace="small")
        store = await PostgresMetadataStore.open(url)
        try:
            await store.insert_file(result_file("file-1"))
            disk.fill()
            with pytest.raises(StorageFull):
                for i in range(2, 10_000):  # until the table needs another page
                    await store.insert_file(result_file(f"file-{i}"))
            assert (await store.get_file("file-1")).id == "file-1"
            disk.free()
            await store.insert_file(result_file("file-after"))
        finally:
            await store.close()
            postgres_server.drop_database(url)
            postgres_server.psql("DROP TABLESPACE small")
    os.rmdir(mount)


async def test_an_application_role_migrates_and_too_many_connections_is_unavailable(postgres_server):
    """An ordinary role owning its database (no superuser): it migrates the schema; past the
    database's connection limit, a server gets StorageUnavailable, not a driver error."""
    app_url = postgres_server.create_database(owner="app")
    postgres_server.set_connection_limit(app_url, 1)
    store = await PostgresMetadataStore.open(app_url)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        with pytest.raises(StorageUnavailable, match="too many connections|TooManyConnections"):
            await PostgresMetadataStore.open(app_url)
        await store.insert_batch(batch("batch_1"))  # the first server is not disturbed
    finally:
        await store.close()
        postgres_server.drop_database(app_url)


def test_the_schema_knows_every_terminal_status():
    """The partial indexes and the queries for unfinished batches name the terminal statuses as
    literals: they must be the domain's (a new terminal status needs a new migration)."""
    assert set(re.findall(r"'(\w+)'", TERMINAL)) == {s.value for s in TERMINAL_STATUSES}
