"""The SQLite metadata store: versioned schema, revisions, and reads that only see commits."""

import time

import aiosqlite
import pytest

from batchgate_server.domain.models import BatchRecord, BatchStatus
from batchgate_server.store.errors import RevisionConflict
from batchgate_server.store.sqlite.metadata import MIGRATIONS, SqliteMetadataStore


def batch(batch_id: str = "batch_1") -> BatchRecord:
    now = time.time()
    return BatchRecord(id=batch_id, project="p", endpoint="/v1/chat/completions", input_file_id="file-1",
                       completion_window="24h", status=BatchStatus.VALIDATING, created_at=now, expires_at=now + 86400)


async def test_schema_is_versioned_and_migrations_run_once(tmp_path):
    path = tmp_path / "db.sqlite3"
    store = await SqliteMetadataStore.open(path)
    assert await store.schema_version() == len(MIGRATIONS)
    await store.close()
    store = await SqliteMetadataStore.open(path)  # reopening migrates nothing and loses nothing
    assert await store.schema_version() == len(MIGRATIONS)
    async with store.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
    await store.close()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(path) as db:
        await db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this server"):
        await SqliteMetadataStore.open(path)


async def test_revision_bumps_with_every_update_and_detects_conflicts(tmp_path):
    store = await SqliteMetadataStore.open(tmp_path / "db.sqlite3")
    b = batch()
    await store.insert_batch(b)
    b.status = BatchStatus.IN_PROGRESS
    await store.update_batch(b)
    assert b.revision == 2 and (await store.get_batch(b.id)).revision == 2
    stale = batch()  # revision 1
    with pytest.raises(RevisionConflict):
        await store.update_batch(stale)
    assert stale.revision == 1, "a failed update leaves the record's revision as it was"
    await store.close()


async def test_reads_never_see_an_open_transaction(tmp_path):
    store = await SqliteMetadataStore.open(tmp_path / "db.sqlite3")
    b = batch()
    await store.insert_batch(b)
    await store.db.execute("BEGIN IMMEDIATE")
    await store.db.execute("UPDATE batches SET status='failed', revision=99 WHERE id=?", (b.id,))
    seen = await store.get_batch(b.id)
    assert seen.revision == 1 and seen.status is BatchStatus.VALIDATING
    await store.db.execute("ROLLBACK")
    assert (await store.get_batch(b.id)).revision == 1
    await store.close()


async def test_a_server_secret_is_shared_by_every_server_on_the_database_and_survives_restarts(tmp_path):
    path = tmp_path / "db.sqlite3"
    first, second = await SqliteMetadataStore.open(path), await SqliteMetadataStore.open(path)  # two replicas
    secret = await first.server_secret("page_tokens")
    assert len(secret) == 32
    assert await second.server_secret("page_tokens") == secret
    assert await second.server_secret("another") not in (secret, b"")
    await first.close()
    await second.close()
    reopened = await SqliteMetadataStore.open(path)
    assert await reopened.server_secret("page_tokens") == secret
    await reopened.close()


async def test_store_errors_are_neutral_not_sqlite(tmp_path):
    from batchgate_server.store.errors import Duplicate

    store = await SqliteMetadataStore.open(tmp_path / "db.sqlite3")
    try:
        first = batch("batch_1")
        first.request_id = "same"
        await store.insert_batch(first)
        again = batch("batch_2")
        again.request_id = "same"
        with pytest.raises(Duplicate):
            await store.insert_batch(again)
    finally:
        await store.close()


async def test_the_space_reserve_is_allocated_next_to_the_database(tmp_path):
    store = await SqliteMetadataStore.open(tmp_path / "db.sqlite3", reserve_bytes=256 * 1024)
    try:
        reserve = tmp_path / "db.sqlite3-reserve"
        assert reserve.stat().st_blocks * 512 >= 256 * 1024, "real blocks, not a sparse file"
        assert not store.reserve.short
    finally:
        await store.close()
