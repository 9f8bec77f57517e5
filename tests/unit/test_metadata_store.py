"""The metadata store: versioned schema, revisions, and reads that only see commits. The tests
taking `open_metadata_store` run on SQLite and PostgreSQL (tests/conftest.py)."""

import json
import time

import aiosqlite
import pytest

from batchgate_server.core.models import BatchError, BatchRecord, BatchStatus, FilePurpose, FileRecord
from batchgate_server.store.errors import Duplicate
from batchgate_server.store.ledger import LedgerFilter, UsageLedger
from batchgate_server.store.metadata import MIGRATIONS, MetadataStore, RevisionConflict


def batch(batch_id: str = "batch_1", *, created_at: float | None = None, project: str = "p") -> BatchRecord:
    now = time.time() if created_at is None else created_at
    return BatchRecord(id=batch_id, project=project, endpoint="/v1/chat/completions", input_file_id="file-1",
                       completion_window="24h", status=BatchStatus.VALIDATING, created_at=now, expires_at=now + 86400)


def result_file(file_id: str, *, created_at: float = 1000.0, purpose: FilePurpose = FilePurpose.BATCH_OUTPUT,
                expires_at: float | None = None, request_id: str = "") -> FileRecord:
    return FileRecord(id=file_id, project="p", filename="out.jsonl", purpose=purpose, bytes=123, sha256="0" * 64,
                      created_at=created_at, expires_at=expires_at, request_id=request_id)


def ledger_row(b: BatchRecord, **fields) -> dict:
    """A ledger row as core/accounting.py writes it."""
    return {"batch_id": b.id, "project": b.project, "api_key_id": "key_1", "model": "m", "provider": "openai",
            "deployment_id": "d", "created_at": b.created_at, "ended_at": time.time(), "input_tokens": 1,
            "cached_tokens": 0, "output_tokens": 1, "reasoning_tokens": 0, "cost_status": "known",
            "cost_amount": "0.1", "cost_nanos": 100_000_000, "metadata": json.dumps(b.metadata),
            "usage_by_model": "{}", **fields}


def usage_ledger(store):
    """The usage ledger of `store`, whichever backend."""
    from batchgate_server.store.postgres import PostgresMetadataStore, PostgresUsageLedger

    return PostgresUsageLedger(store) if isinstance(store, PostgresMetadataStore) else UsageLedger(store)


async def test_schema_is_versioned_and_migrations_run_once(tmp_path):
    path = tmp_path / "db.sqlite3"
    store = await MetadataStore.open(path)
    assert await store.schema_version() == len(MIGRATIONS)
    await store.close()
    store = await MetadataStore.open(path)  # reopening migrates nothing and loses nothing
    assert await store.schema_version() == len(MIGRATIONS)
    async with store.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
    await store.close()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(path) as db:
        await db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this server"):
        await MetadataStore.open(path)


async def test_revision_bumps_with_every_update_and_detects_conflicts(open_metadata_store):
    store = await open_metadata_store()
    b = batch()
    await store.insert_batch(b)
    b.status = BatchStatus.IN_PROGRESS
    await store.update_batch(b)
    assert b.revision == 2 and (await store.get_batch(b.id)).revision == 2
    stale = batch()  # revision 1
    with pytest.raises(RevisionConflict):
        await store.update_batch(stale)
    assert stale.revision == 1, "a failed update leaves the record's revision as it was"
    with pytest.raises(RevisionConflict):  # the terminal transaction too, and it writes nothing
        stale.status = BatchStatus.COMPLETED
        await store.update_batch(stale, extra_files=[result_file("file-out")], ledger=ledger_row(stale))
    assert stale.revision == 1 and await store.get_file("file-out") is None
    assert (await store.get_batch(b.id)).status is BatchStatus.IN_PROGRESS


async def test_reads_never_see_an_open_transaction(tmp_path):
    store = await MetadataStore.open(tmp_path / "db.sqlite3")
    b = batch()
    await store.insert_batch(b)
    await store.db.execute("BEGIN IMMEDIATE")
    await store.db.execute("UPDATE batches SET status='failed', revision=99 WHERE id=?", (b.id,))
    seen = await store.get_batch(b.id)
    assert seen.revision == 1 and seen.status is BatchStatus.VALIDATING
    await store.db.execute("ROLLBACK")
    assert (await store.get_batch(b.id)).revision == 1
    await store.close()


async def test_a_server_secret_is_shared_by_every_server_on_the_database_and_survives_restarts(
        open_metadata_store):
    first, second = await open_metadata_store(), await open_metadata_store()  # two replicas
    secret = await first.server_secret("page_tokens")
    assert len(secret) == 32
    assert await second.server_secret("page_tokens") == secret
    assert await second.server_secret("another") not in (secret, b"")
    await first.close()
    await second.close()
    reopened = await open_metadata_store()
    assert await reopened.server_secret("page_tokens") == secret


async def test_store_errors_are_neutral(open_metadata_store):
    store = await open_metadata_store()
    first = batch("batch_1")
    first.request_id = "same"
    await store.insert_batch(first)
    again = batch("batch_2")
    again.request_id = "same"
    with pytest.raises(Duplicate):
        await store.insert_batch(again)
    with pytest.raises(Duplicate):  # the same id
        await store.insert_batch(batch("batch_1"))
    f = result_file("file-1", request_id="upload-1")
    await store.insert_file(f)
    with pytest.raises(Duplicate):
        await store.insert_file(result_file("file-2", request_id="upload-1"))


async def test_the_terminal_transaction_writes_files_and_the_ledger_row_once(open_metadata_store):
    store = await open_metadata_store()
    b = batch()
    await store.insert_batch(b)
    b.status = BatchStatus.COMPLETED
    out = result_file("file-out")
    await store.update_batch(b, extra_files=[out], ledger=ledger_row(b, input_tokens=7))
    assert (await store.get_file("file-out")).bytes == out.bytes
    # A finalisation redone after a crash writes the same result file and ledger row again.
    await store.update_batch(b, extra_files=[out], ledger=ledger_row(b, input_tokens=99))
    assert b.revision == 3
    totals = await usage_ledger(store).totals(LedgerFilter())
    assert (totals.batch_count, totals.input_tokens) == (1, 7), "the first row stays, written once"


async def test_keyset_listings_newest_first_by_project_status_and_purpose(open_metadata_store):
    store = await open_metadata_store()
    for i in range(5):
        b = batch(f"batch_{i}", created_at=1000.0 + i // 2, project="p" if i != 3 else "q")
        await store.insert_batch(b)
        if i % 2:
            b.status = BatchStatus.IN_PROGRESS
            await store.update_batch(b)
        await store.insert_file(result_file(f"file-{i}", created_at=1000.0 + i // 2,
                                            purpose=FilePurpose.BATCH if i % 2 else FilePurpose.BATCH_OUTPUT))
    ids = [b.id for b in await store.list_batches(None, (), 10, None)]
    assert ids == ["batch_4", "batch_3", "batch_2", "batch_1", "batch_0"], "created_at then id, descending"
    assert [b.id for b in await store.list_batches("p", (), 10, None)] == ["batch_4", "batch_2", "batch_1", "batch_0"]
    assert [b.id for b in await store.list_batches(None, [BatchStatus.IN_PROGRESS] * 3, 10, None)] == [
        "batch_3", "batch_1"]
    page = await store.list_batches(None, (), 2, None)
    rest = await store.list_batches(None, (), 10, (page[-1].created_at, page[-1].id))
    assert [b.id for b in page + rest] == ids
    files = await store.list_files(None, FilePurpose.BATCH.value, 10, None)
    assert [f.id for f in files] == ["file-3", "file-1"]
    after = await store.list_files("p", None, 10, (1001.0, "file-3"))
    assert [f.id for f in after] == ["file-2", "file-1", "file-0"]


async def test_active_batches_and_the_batch_reading_a_file(open_metadata_store):
    store = await open_metadata_store()
    running, ended = batch("batch_1"), batch("batch_2")
    ended.input_file_id = "file-2"
    for b in (running, ended):
        await store.insert_batch(b)
    ended.status = BatchStatus.CANCELLED
    await store.update_batch(ended)
    assert [b.id for b in await store.active_batches()] == ["batch_1"]
    assert await store.active_batch_reading("file-1") == "batch_1"
    assert await store.active_batch_reading("file-2") is None


async def test_files_expire_and_delete(open_metadata_store):
    store = await open_metadata_store()
    await store.insert_file(result_file("file-old", expires_at=100.0))
    await store.insert_file(result_file("file-new", expires_at=time.time() + 3600))
    assert [f.id for f in await store.expired_files(200.0)] == ["file-old"]
    assert await store.all_file_ids() == {"file-old", "file-new"}
    assert await store.delete_file("file-old") is True
    assert await store.delete_file("file-old") is False
    assert await store.get_file("file-old") is None


async def test_api_keys(open_metadata_store):
    store = await open_metadata_store()
    assert await store.count_api_keys() == 0
    await store.add_api_key("hash-1", "key_1", "p", time.time())
    assert await store.find_api_key("hash-1") == ("key_1", "p")
    assert await store.find_api_key("hash-2") is None
    assert await store.count_api_keys() == 1
    with pytest.raises(Duplicate):
        await store.add_api_key("hash-1", "key_2", "p", time.time())


async def test_text_holding_nul_is_kept_and_looked_up_exactly(open_metadata_store):
    """PostgreSQL's text cannot hold U+0000, which the API accepts in request ids, metadata and an
    uploaded file's model: stored and found exactly, and a lookup by such an id finds nothing."""
    store = await open_metadata_store()
    one, two = batch("batch_1"), batch("batch_2")
    one.request_id, two.request_id = "nul\x00one", "nul\x00two"
    one.metadata = {"k\x00": "v\x00"}
    one.errors = [BatchError(code="upstream", message="a \x00 in an upstream message")]
    await store.insert_batch(one)
    await store.insert_batch(two)
    assert (await store.get_batch_by_request_id("p", "nul\x00one")).id == "batch_1"
    assert (await store.get_batch_by_request_id("p", "nul\x00two")).id == "batch_2"
    assert await store.get_batch_by_request_id("p", "nul") is None
    got = await store.get_batch("batch_1")
    assert got.metadata == {"k\x00": "v\x00"} and got.errors == one.errors
    for odd in ("batch_1\x00", "\x00", "batch_\x00\r\n\ufeff\u202e"):
        assert await store.get_batch(odd) is None and await store.get_file(odd) is None
        assert await store.active_batch_reading(odd) is None and await store.delete_file(odd) is False
        assert await store.find_api_key(odd) is None
        assert await store.list_batches(odd, (), 10, None) == []
    f = result_file("file-1", request_id="up\x00load")
    f.model = "gpt\x00x"
    await store.insert_file(f)
    assert (await store.get_file_by_request_id("p", "up\x00load")).model == "gpt\x00x"


async def test_the_space_reserve_is_allocated_next_to_the_database(tmp_path):
    store = await MetadataStore.open(tmp_path / "db.sqlite3", reserve_bytes=256 * 1024)
    try:
        reserve = tmp_path / "db.sqlite3-reserve"
        assert reserve.stat().st_blocks * 512 >= 256 * 1024, "real blocks, not a sparse file"
        assert not store.reserve.short
    finally:
        await store.close()
