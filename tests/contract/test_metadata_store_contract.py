"""The contract of store.ports.MetadataStore and UsageLedger, run against every implementation in
tests/contract/backends.py: round trips, revisions and compare-and-set, request_id uniqueness,
keyset listings, the ledger written once per batch and its queries, read-your-writes across
handles, server secrets."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json

import pytest

from batchgate_server.domain.models import (
    ApiKeyRecord,
    BatchError,
    BatchRecord,
    BatchStatus,
    Cost,
    FailureCount,
    FilePurpose,
    FileRecord,
    ProjectQuota,
    RequestCounts,
    ShardSummary,
    Usage,
)
from batchgate_server.domain.shards import FileGroup, PlannedPart, ShardSelection
from batchgate_server.domain.webhooks import OutboxEvent, WebhookEndpoint
from batchgate_server.store.errors import Duplicate, LeaseLost, QuotaReached, RevisionConflict
from batchgate_server.store.ports import Dimension, LedgerFilter

NOW = 1_700_000_000.0


def file_record(file_id: str, *, project: str = "p", created_at: float = NOW, request_id: str = "",
                purpose: FilePurpose = FilePurpose.BATCH, expires_at: float | None = None) -> FileRecord:
    return FileRecord(id=file_id, project=project, filename=f"{file_id}.jsonl", purpose=purpose, bytes=123,
                      sha256="ab" * 32, created_at=created_at, expires_at=expires_at, line_count=3,
                      endpoint="/v1/chat/completions", model="gpt-4o-mini", request_id=request_id)


def batch_record(batch_id: str, *, project: str = "p", created_at: float = NOW, request_id: str = "",
                 status: BatchStatus = BatchStatus.VALIDATING, input_file_id: str = "file-in") -> BatchRecord:
    return BatchRecord(id=batch_id, project=project, endpoint="/v1/chat/completions", input_file_id=input_file_id,
                       completion_window="24h", status=status, created_at=created_at, expires_at=created_at + 86400,
                       request_id=request_id)


def ledger_row(batch_id: str, *, project: str = "p", model: str = "m", provider: str = "openai",
               key: str = "k", ended_at: float = 100.0, tokens: tuple[int, int, int, int] = (10, 2, 5, 1),
               nanos: int | None = 100_000_000, metadata: dict | None = None) -> dict:
    """A ledger row as core/accounting.py ledger_row builds it."""
    known = nanos is not None
    return {
        "batch_id": batch_id, "project": project, "api_key_id": key, "model": model, "provider": provider,
        "deployment_id": "dep", "created_at": ended_at - 1, "ended_at": ended_at,
        "input_tokens": tokens[0], "cached_tokens": tokens[1], "output_tokens": tokens[2],
        "reasoning_tokens": tokens[3], "cost_status": "known" if known else "unknown",
        "cost_amount": f"{nanos / 1e9:.9f}" if known else "", "cost_nanos": nanos,
        "metadata": json.dumps(metadata or {}), "usage_by_model": "{}",
    }


async def end_batch(store, batch_id: str, row: dict, **kw) -> BatchRecord:
    """Insert a batch and end it with `row` as its ledger row."""
    b = batch_record(batch_id, **kw)
    await store.insert_batch(b)
    b.status = BatchStatus.COMPLETED
    return await store.update_batch(b, ledger=row)


# -- files -------------------------------------------------------------------------------


async def test_a_file_round_trips_whole(database):
    store = database.metadata
    f = file_record("file-1", request_id="req-1", expires_at=NOW + 60)
    await store.insert_file(f)
    assert await store.get_file("file-1") == f
    assert await store.get_file_by_request_id("p", "req-1") == f
    assert await store.get_file("file-none") is None
    assert await store.get_file_by_request_id("p", "req-none") is None
    assert await store.get_file_by_request_id("other", "req-1") is None  # request_ids are per project


async def test_a_mixed_file_round_trips_with_its_groups(database):
    store = database.metadata
    groups = [FileGroup("/v1/chat/completions", "gpt-4o", 3, [1, 4, 9]),
              FileGroup("/v1/embeddings", "emb\u00e9 \U0001f680 \"q\" \x00", 1, [2])]
    f = dataclasses.replace(file_record("file-1"), endpoint="", model="", line_count=4, groups=groups)
    await store.insert_file(f)
    assert await store.get_file("file-1") == f
    assert (await store.list_files("p", None, 10, None)) == [f]


async def test_a_file_stored_before_groups_reads_with_none(database):
    # Output files, and batch files uploaded before groups were kept, have no groups.
    f = file_record("file-1", purpose=FilePurpose.BATCH_OUTPUT)
    await database.metadata.insert_file(f)
    assert (await database.metadata.get_file("file-1")).groups == []


async def test_a_file_without_request_id_round_trips_with_an_empty_one(database):
    f = file_record("file-1")
    await database.metadata.insert_file(f)
    assert (await database.metadata.get_file("file-1")).request_id == ""


async def test_a_file_request_id_is_unique_per_project(database):
    store = database.metadata
    await store.insert_file(file_record("file-1", request_id="same"))
    with pytest.raises(Duplicate):
        await store.insert_file(file_record("file-2", request_id="same"))
    await store.insert_file(file_record("file-3", project="other", request_id="same"))
    # No request_id is no constraint.
    await store.insert_file(file_record("file-4"))
    await store.insert_file(file_record("file-5"))
    assert await store.get_file("file-2") is None
    assert await store.all_file_ids() == {"file-1", "file-3", "file-4", "file-5"}


async def test_a_file_id_is_unique(database):
    await database.metadata.insert_file(file_record("file-1"))
    with pytest.raises(Duplicate):
        await database.metadata.insert_file(file_record("file-1", project="other"))


async def test_files_list_newest_first_by_keyset_with_filters(database):
    store = database.metadata
    # Two share a created_at: the id breaks the tie (descending).
    records = [file_record("file-a", created_at=NOW), file_record("file-b", created_at=NOW + 1),
               file_record("file-c", created_at=NOW + 1), file_record("file-d", created_at=NOW + 2),
               file_record("file-o", created_at=NOW + 3, project="other"),
               file_record("file-x", created_at=NOW + 4, purpose=FilePurpose.BATCH_OUTPUT)]
    for f in records:
        await store.insert_file(f)
    ids = lambda rows: [f.id for f in rows]  # noqa: E731
    assert ids(await store.list_files("p", None, 10, None)) == ["file-x", "file-d", "file-c", "file-b", "file-a"]
    assert ids(await store.list_files(None, None, 10, None)) == ["file-x", "file-o", "file-d", "file-c", "file-b",
                                                                 "file-a"]
    assert ids(await store.list_files("p", "batch", 10, None)) == ["file-d", "file-c", "file-b", "file-a"]
    assert ids(await store.list_files("p", "batch_output", 10, None)) == ["file-x"]
    first = await store.list_files("p", "batch", 2, None)
    assert ids(first) == ["file-d", "file-c"]
    last = first[-1]
    assert ids(await store.list_files("p", "batch", 2, (last.created_at, last.id))) == ["file-b", "file-a"]
    assert await store.list_files("p", "batch", 2, (NOW, "file-a")) == []
    assert await store.list_files("nobody", None, 10, None) == []
    # Oldest first (the HTTP API's order=asc): the same keyset, ascending, the id breaking the tie.
    oldest = await store.list_files("p", "batch", 2, None, oldest_first=True)
    assert ids(oldest) == ["file-a", "file-b"]
    last = oldest[-1]
    assert ids(await store.list_files("p", "batch", 2, (last.created_at, last.id), oldest_first=True)) == [
        "file-c", "file-d"]


async def test_delete_file_says_whether_there_was_one(database):
    store = database.metadata
    await store.insert_file(file_record("file-1"))
    assert await store.delete_file("file-1") is True
    assert await store.delete_file("file-1") is False
    assert await store.get_file("file-1") is None


async def test_expired_files_are_those_due_at_now_up_to_the_limit(database):
    store = database.metadata
    for i, expires in enumerate([NOW - 10, NOW, NOW + 10, None, NOW - 5]):
        await store.insert_file(file_record(f"file-{i}", expires_at=expires))
    assert {f.id for f in await store.expired_files(NOW)} == {"file-0", "file-1", "file-4"}
    assert len(await store.expired_files(NOW, limit=2)) == 2
    assert await store.expired_files(NOW - 100) == []


# -- batches ------------------------------------------------------------------------------


async def test_a_batch_round_trips_whole(database):
    store = database.metadata
    b = batch_record("batch_1", request_id="req-1")
    b.model, b.provider, b.deployment_id, b.api_key_id = "m", "openai", "dep-1", "key-1"
    b.metadata = {"team": "search", "ünïcode": "✓"}
    b.request_counts = RequestCounts(total=3, completed=2, failed=1)
    b.errors = [BatchError("invalid", "line 2 is bad", param="body", line=2)]
    b.failures = [FailureCount("http_429", count=1, retried=4, sample_message="slow down")]
    b.usage = Usage(10, 2, 5, 1)
    b.cost = Cost(status="known", amount="0.000123", input_amount="0.0001", output_amount="0.000023")
    b.provider_state = {"job": {"id": "j-1", "parts": [1, 2]}, "n": 3}
    b.result_file_ids = ["file-o", "file-e"]
    b.price = {"input": "1.5"}
    b.requested_model = "m"
    await store.insert_batch(b)
    assert await store.get_batch("batch_1") == b
    assert await store.get_batch_by_request_id("p", "req-1") == b
    assert await store.get_batch_by_request_id("other", "req-1") is None
    assert await store.get_batch("batch_none") is None


async def test_a_batch_request_id_is_unique_per_project(database):
    store = database.metadata
    await store.insert_batch(batch_record("batch_1", request_id="same"))
    with pytest.raises(Duplicate):
        await store.insert_batch(batch_record("batch_2", request_id="same"))
    await store.insert_batch(batch_record("batch_3", project="other", request_id="same"))
    await store.insert_batch(batch_record("batch_4"))
    await store.insert_batch(batch_record("batch_5"))
    assert await store.get_batch("batch_2") is None
    with pytest.raises(Duplicate):
        await store.insert_batch(batch_record("batch_1"))


async def test_update_bumps_the_revision_and_compares_it(database):
    store = database.metadata
    b = batch_record("batch_1")
    await store.insert_batch(b)
    stale = dataclasses.replace(b)
    b.status = BatchStatus.IN_PROGRESS
    returned = await store.update_batch(b)
    assert returned.revision == 2 and b.revision == 2
    assert (await store.get_batch("batch_1")).status is BatchStatus.IN_PROGRESS
    stale.status = BatchStatus.FAILED
    with pytest.raises(RevisionConflict):
        await store.update_batch(stale)
    assert stale.revision == 1  # unchanged by the failed write
    stored = await store.get_batch("batch_1")
    assert (stored.status, stored.revision) == (BatchStatus.IN_PROGRESS, 2)
    stored.status = BatchStatus.COMPLETED
    assert (await store.update_batch(stored)).revision == 3


async def test_an_update_of_a_missing_batch_is_a_conflict(database):
    with pytest.raises(RevisionConflict):
        await database.metadata.update_batch(batch_record("batch_never"))


async def test_only_one_of_two_concurrent_writers_of_a_revision_wins(database_backend, database):
    other = (await database_backend.open()).metadata
    b = batch_record("batch_1")
    await database.metadata.insert_batch(b)
    one, two = dataclasses.replace(b), dataclasses.replace(b)
    one.status, two.status = BatchStatus.IN_PROGRESS, BatchStatus.FAILED
    results = await asyncio.gather(database.metadata.update_batch(one), other.update_batch(two),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["BatchRecord", "RevisionConflict"]
    winner = next(r for r in results if isinstance(r, BatchRecord))
    stored = await other.get_batch("batch_1")
    assert (stored.status, stored.revision) == (winner.status, 2)


async def test_result_files_are_written_with_the_update_and_a_redone_one_keeps_them(database):
    store = database.metadata
    b = batch_record("batch_1")
    await store.insert_batch(b)
    out = file_record("file-out", purpose=FilePurpose.BATCH_OUTPUT)
    b.status = BatchStatus.COMPLETED
    b.output_file_id = out.id
    await store.update_batch(b, extra_files=[out])
    assert await store.get_file("file-out") == out
    # A finalisation redone after a crash passes the same file again: kept, no Duplicate.
    await store.update_batch(b, extra_files=[out, file_record("file-err", purpose=FilePurpose.BATCH_OUTPUT)])
    assert {"file-out", "file-err"} <= await store.all_file_ids()


async def test_a_conflicting_update_writes_none_of_its_files_nor_its_ledger_row(database):
    store = database.metadata
    b = batch_record("batch_1")
    await store.insert_batch(b)
    stale = dataclasses.replace(b)
    await store.update_batch(b)
    with pytest.raises(RevisionConflict):
        await store.update_batch(stale, extra_files=[file_record("file-out")], ledger=ledger_row("batch_1"))
    assert await store.get_file("file-out") is None
    assert (await database.ledger.totals(LedgerFilter())).batch_count == 0


async def test_an_update_whose_file_is_a_duplicate_writes_nothing(database):
    store = database.metadata
    await store.insert_file(file_record("file-1", request_id="taken"))
    b = batch_record("batch_1")
    await store.insert_batch(b)
    with pytest.raises(Duplicate):
        await store.update_batch(dataclasses.replace(b, status=BatchStatus.COMPLETED),
                                 extra_files=[file_record("file-2", request_id="taken")], ledger=ledger_row("batch_1"))
    stored = await store.get_batch("batch_1")
    assert (stored.status, stored.revision) == (BatchStatus.VALIDATING, 1)
    assert (await database.ledger.totals(LedgerFilter())).batch_count == 0


async def test_batches_list_newest_first_by_keyset_with_status_filter(database):
    store = database.metadata
    statuses = [BatchStatus.COMPLETED, BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.IN_PROGRESS]
    for i, status in enumerate(statuses):
        await store.insert_batch(batch_record(f"batch_{i}", created_at=NOW + i // 2, status=status))
    await store.insert_batch(batch_record("batch_o", created_at=NOW + 9, project="other"))
    ids = lambda rows: [b.id for b in rows]  # noqa: E731
    assert ids(await store.list_batches("p", [], 10, None)) == ["batch_3", "batch_2", "batch_1", "batch_0"]
    assert ids(await store.list_batches(None, [], 10, None))[0] == "batch_o"
    assert ids(await store.list_batches("p", [BatchStatus.IN_PROGRESS], 10, None)) == ["batch_3", "batch_1"]
    assert ids(await store.list_batches("p", [BatchStatus.FAILED, BatchStatus.COMPLETED], 10, None)) == [
        "batch_2", "batch_0"]
    page = await store.list_batches("p", [], 3, None)
    assert ids(await store.list_batches("p", [], 3, (page[-1].created_at, page[-1].id))) == ["batch_0"]


async def test_active_batches_are_the_unfinished_oldest_first(database):
    store = database.metadata
    await store.insert_batch(batch_record("batch_new", created_at=NOW + 2, input_file_id="file-a"))
    await store.insert_batch(batch_record("batch_old", created_at=NOW, status=BatchStatus.CANCELLING,
                                          input_file_id="file-b"))
    for i, status in enumerate(s for s in BatchStatus if s.is_terminal):
        await store.insert_batch(batch_record(f"batch_end{i}", created_at=NOW + 1, status=status,
                                              input_file_id="file-c"))
    assert [b.id for b in await store.active_batches()] == ["batch_old", "batch_new"]
    assert await store.active_batch_reading("file-a") == "batch_new"
    assert await store.active_batch_reading("file-b") == "batch_old"
    assert await store.active_batch_reading("file-c") is None  # only ended batches read it
    assert await store.active_batch_reading("file-none") is None


# -- api keys and secrets ------------------------------------------------------------------


def api_key(key_id: str, *, project: str = "p", created_at: float = NOW, **kw) -> ApiKeyRecord:
    return ApiKeyRecord(id=key_id, project=project, created_at=created_at, **kw)


async def test_api_keys_are_found_by_hash_and_counted(database):
    store = database.metadata
    assert await store.count_api_keys() == 0
    await store.add_api_key("hash-1", api_key("key-1", name="ci", expires_at=NOW + 60))
    await store.add_api_key("hash-2", api_key("key-2", project="q"))
    assert await store.find_api_key("hash-1") == api_key("key-1", name="ci", expires_at=NOW + 60)
    assert await store.find_api_key("hash-none") is None
    assert await store.get_api_key("key-2") == api_key("key-2", project="q")
    assert await store.get_api_key("key-none") is None
    assert await store.count_api_keys() == 2
    with pytest.raises(Duplicate):
        await store.add_api_key("hash-1", api_key("key-3"))
    with pytest.raises(Duplicate):
        await store.add_api_key("hash-3", api_key("key-1"))


async def test_a_revoked_key_is_still_found_and_no_longer_counted(database_backend, database):
    store = database.metadata
    await store.add_api_key("hash-1", api_key("key-1"))
    other = (await database_backend.open()).metadata  # another replica on the same database
    revoked = await other.revoke_api_key("key-1", NOW + 5)
    assert revoked is not None and revoked.revoked_at == NOW + 5
    assert (await store.find_api_key("hash-1")).revoked_at == NOW + 5
    assert await store.count_api_keys() == 0
    # Revoking again keeps the first time; an unknown id is None.
    assert (await store.revoke_api_key("key-1", NOW + 9)).revoked_at == NOW + 5
    assert await store.revoke_api_key("key-none", NOW) is None


async def test_touching_a_key_records_its_last_use(database):
    store = database.metadata
    await store.add_api_key("hash-1", api_key("key-1"))
    await store.touch_api_key("key-1", NOW + 61)
    assert (await store.find_api_key("hash-1")).last_used_at == NOW + 61


async def test_api_keys_list_newest_first_by_project_in_keyset_pages(database):
    store = database.metadata
    for i in range(5):
        await store.add_api_key(f"hash-{i}", api_key(f"key-{i}", project="p" if i % 2 else "q",
                                                     created_at=NOW + i // 2))
    everything = [k.id for k in await store.list_api_keys(None, 10, None)]
    assert everything == ["key-4", "key-3", "key-2", "key-1", "key-0"]
    assert [k.id for k in await store.list_api_keys("p", 10, None)] == ["key-3", "key-1"]
    assert [k.id for k in await store.list_api_keys(None, 2, (NOW + 1, "key-3"))] == ["key-2", "key-1"]


async def test_project_quotas_round_trip_replace_and_delete(database):
    store = database.metadata
    assert await store.get_project_quota("p") is None
    quota = ProjectQuota("p", max_running_batches=2, max_stored_bytes=10**12, max_uploads=0,
                         monthly_budget_nanos=250 * 10**9)
    await store.set_project_quota(quota)
    assert await store.get_project_quota("p") == quota
    await store.set_project_quota(ProjectQuota("p", max_uploads=3))
    assert await store.get_project_quota("p") == ProjectQuota("p", max_uploads=3)
    assert await store.get_project_quota("q") is None
    assert await store.delete_project_quota("p") is True
    assert await store.delete_project_quota("p") is False
    assert await store.get_project_quota("p") is None


async def test_stored_bytes_sum_a_projects_files(database):
    store = database.metadata
    assert await store.stored_bytes("p") == 0
    for file_id, project in (("file-1", "p"), ("file-2", "p"), ("file-3", "q")):
        await store.insert_file(file_record(file_id, project=project))  # 123 bytes each
    assert await store.stored_bytes("p") == 246
    await store.delete_file("file-1")
    assert await store.stored_bytes("p") == 123


async def test_unfinished_batches_are_counted_per_project(database):
    store = database.metadata
    await store.insert_batch(batch_record("batch-1"))
    await store.insert_batch(batch_record("batch-2", status=BatchStatus.IN_PROGRESS))
    await store.insert_batch(batch_record("batch-3", status=BatchStatus.COMPLETED))
    await store.insert_batch(batch_record("batch-4", project="q"))
    assert await store.count_unfinished_batches("p") == 2
    ended = await store.get_batch("batch-1")
    ended.status = BatchStatus.CANCELLED
    await store.update_batch(ended)
    assert await store.count_unfinished_batches("p") == 1
    assert await store.count_unfinished_batches("none") == 0


async def test_a_server_secret_is_made_once_and_shared(database_backend, database):
    other = (await database_backend.open()).metadata
    first, racing = await asyncio.gather(database.metadata.server_secret("tokens"), other.server_secret("tokens"))
    assert len(first) == 32 and first == racing
    assert await database.metadata.server_secret("tokens") == first
    assert await database.metadata.server_secret("another") not in (first, b"")


# -- read-your-writes -----------------------------------------------------------------------


async def test_every_returned_write_is_seen_by_the_next_read_on_any_handle(database_backend, database):
    writer, other = database.metadata, (await database_backend.open()).metadata

    async def sequence(i: int) -> None:
        b = batch_record(f"batch_{i}")
        await writer.insert_batch(b)
        for _ in range(10):
            b.request_counts = RequestCounts(total=10, completed=b.revision)
            await writer.update_batch(b)
            for reader in (writer, other):
                seen = await reader.get_batch(b.id)
                assert seen.revision == b.revision and seen.request_counts.completed == b.revision - 1

    async def background(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await other.list_batches(None, [], 50, None)

    stop = asyncio.Event()
    noise = [asyncio.create_task(background(stop)) for _ in range(4)]
    try:
        await asyncio.gather(*(sequence(i) for i in range(8)))
    finally:
        stop.set()
        await asyncio.gather(*noise)
    f = file_record("file-1")
    await writer.insert_file(f)
    assert await other.get_file("file-1") == f
    await writer.delete_file("file-1")
    assert await other.get_file("file-1") is None



@pytest.mark.parametrize("sole_writer", [False, True], ids=["shared", "sole-writer"])
async def test_refresh_returns_the_known_state_until_any_handle_writes_a_new_one(database_backend, database,
                                                                                  sole_writer):
    """sole_writer: the handles are this process's only writers (a server on its own data
    directory), which a store may use to answer without a read."""
    writer, other = database.metadata, (await database_backend.open()).metadata
    if sole_writer:
        writer.assume_sole_writer()
        other.assume_sole_writer()
    await writer.insert_batch(batch_record("batch_1"))
    for reader in (writer, other):
        known = await reader.get_batch("batch_1")
        assert await reader.refresh_batch(known) is known  # unchanged: the caller's own state back
        assert await reader.refresh_batch(known) is known
    changed = await writer.get_batch("batch_1")
    changed.status = BatchStatus.IN_PROGRESS
    await writer.update_batch(changed)
    for reader in (writer, other):
        fresh = await reader.refresh_batch(known)
        assert fresh is not known and fresh == changed
        assert (known.revision, known.status) == (1, BatchStatus.VALIDATING)  # the caller's state untouched
        assert await reader.refresh_batch(fresh) is fresh
    assert await other.refresh_batch(batch_record("batch_none")) is None
    assert await other.refresh_batch(batch_record("batch_1", project="other")) == changed  # read by id only

# -- the usage ledger ------------------------------------------------------------------------


async def test_the_ledger_row_is_written_once_per_batch(database):
    store = database.metadata
    b = await end_batch(store, "batch_1", ledger_row("batch_1", tokens=(10, 0, 5, 0)))
    # A later write of the same batch's row (a redone end) is ignored, not an error.
    await store.update_batch(b, ledger=ledger_row("batch_1", tokens=(999, 0, 999, 0)))
    totals = await database.ledger.totals(LedgerFilter())
    assert (totals.batch_count, totals.input_tokens, totals.output_tokens) == (1, 10, 5)


async def test_ledger_totals_are_exact_and_count_unknown_costs(database):
    store = database.metadata
    assert (await database.ledger.totals(LedgerFilter())).batch_count == 0
    big = 10**15 + 1  # a million dollars and a nano-dollar: no float would keep it
    await end_batch(store, "batch_1", ledger_row("batch_1", nanos=big, tokens=(2**40, 1, 2, 3)))
    await end_batch(store, "batch_2", ledger_row("batch_2", nanos=1, tokens=(1, 1, 1, 1)))
    await end_batch(store, "batch_3", ledger_row("batch_3", nanos=None))
    t = await database.ledger.totals(LedgerFilter())
    assert (t.batch_count, t.cost_nanos, t.unknown_cost) == (3, big + 1, 1)
    assert (t.input_tokens, t.cached_tokens, t.output_tokens, t.reasoning_tokens) == (2**40 + 11, 4, 8, 5)


async def test_ledger_filters(database):
    store = database.metadata
    rows = [ledger_row("b1", ended_at=100, project="p", model="m1", provider="openai"),
            ledger_row("b2", ended_at=200, project="p", model="m2", provider="anthropic"),
            ledger_row("b3", ended_at=300, project="q", model="m1", provider="openai")]
    for r in rows:
        await end_batch(store, r["batch_id"], r, project=r["project"])
    count = lambda **f: database.ledger.totals(LedgerFilter(**f))  # noqa: E731
    assert (await count(start=200)).batch_count == 2
    assert (await count(end=200)).batch_count == 1  # end is exclusive
    assert (await count(start=100, end=300)).batch_count == 2
    assert (await count(project="q")).batch_count == 1
    assert (await count(project="nobody")).batch_count == 0
    assert (await count(model="m1")).batch_count == 2
    assert (await count(provider="anthropic")).batch_count == 1


async def test_ledger_groups_in_value_order_with_a_keyset_cursor(database):
    store = database.metadata
    for i, (model, provider) in enumerate([("b", "x"), ("a", "y"), ("a", "x"), ("c", "x"), ("a", "x")]):
        await end_batch(store, f"batch_{i}", ledger_row(f"batch_{i}", model=model, provider=provider))
    dims = [Dimension("model"), Dimension("provider")]
    groups = await database.ledger.aggregate(LedgerFilter(), dims, limit=10)
    assert [(g.group["model"], g.group["provider"], g.batch_count) for g in groups] == [
        ("a", "x", 2), ("a", "y", 1), ("b", "x", 1), ("c", "x", 1)]
    first = await database.ledger.aggregate(LedgerFilter(), dims, limit=2)
    rest = await database.ledger.aggregate(LedgerFilter(), dims, limit=10, after=json.loads(json.dumps(
        first[-1].sort_key)))  # a cursor survives a page token's JSON
    assert [g.group for g in first + rest] == [g.group for g in groups]
    [everything] = await database.ledger.aggregate(LedgerFilter(), [], limit=10)
    assert everything.batch_count == 5
    assert await database.ledger.aggregate(LedgerFilter(), [], limit=10, after=everything.sort_key or [0]) == []
    assert await database.ledger.aggregate(LedgerFilter(project="nobody"), [], limit=10) == []


async def test_ledger_groups_by_a_metadata_key_with_the_absent_first(database):
    store = database.metadata
    odd = 'we"ird.key[0]'  # no JSON-path quoting of arbitrary keys
    metas = [{"team": "b"}, {}, {"team": "a"}, {"other": "x"}, {"team": "a", odd: "1"}]
    for i, meta in enumerate(metas):
        await end_batch(store, f"batch_{i}", ledger_row(f"batch_{i}", metadata=meta))
    groups = await database.ledger.aggregate(LedgerFilter(), [Dimension("metadata", "team")], limit=10)
    assert [(g.group, g.batch_count) for g in groups] == [
        ({}, 2), ({"metadata.team": "a"}, 2), ({"metadata.team": "b"}, 1)]
    page = await database.ledger.aggregate(LedgerFilter(), [Dimension("metadata", "team")], limit=1)
    after = await database.ledger.aggregate(LedgerFilter(), [Dimension("metadata", "team")], limit=10,
                                            after=page[0].sort_key)
    assert [g.group for g in after] == [{"metadata.team": "a"}, {"metadata.team": "b"}]
    [weird] = [g for g in await database.ledger.aggregate(LedgerFilter(), [Dimension("metadata", odd)], limit=10)
               if g.group]
    assert weird.group == {f"metadata.{odd}": "1"}


async def test_the_high_water_mark_pins_a_query_to_the_rows_it_had(database):
    store = database.metadata
    assert await database.ledger.high_water() == 0
    await end_batch(store, "batch_1", ledger_row("batch_1"))
    mark = await database.ledger.high_water()
    await end_batch(store, "batch_2", ledger_row("batch_2"))
    assert await database.ledger.high_water() > mark
    assert (await database.ledger.totals(LedgerFilter(as_of=mark))).batch_count == 1
    assert (await database.ledger.totals(LedgerFilter())).batch_count == 2


async def test_the_ledger_sees_a_batch_end_as_soon_as_it_returns(database_backend, database):
    other = await database_backend.open()
    for i in range(20):
        await end_batch(database.metadata, f"batch_{i}", ledger_row(f"batch_{i}"))
        assert (await other.ledger.totals(LedgerFilter())).batch_count == i + 1


# -- any text the API accepts ------------------------------------------------------------


async def test_text_holding_nul_round_trips_and_a_lookup_by_such_an_id_finds_nothing(database):
    """The API accepts U+0000 in request ids, metadata and an uploaded file's model (PostgreSQL's
    text cannot hold it): stored and found exactly, and an id no record can have finds none."""
    store = database.metadata
    one = batch_record("batch_1", request_id="nul\x00one")
    one.metadata = {"k\x00": "v\x00"}
    one.errors = [BatchError(code="upstream", message="a \x00 in an upstream message")]
    await store.insert_batch(one)
    await store.insert_batch(batch_record("batch_2", request_id="nul\x00two"))
    assert (await store.get_batch_by_request_id("p", "nul\x00one")).id == "batch_1"
    assert (await store.get_batch_by_request_id("p", "nul\x00two")).id == "batch_2"
    assert await store.get_batch_by_request_id("p", "nul") is None
    assert await store.get_batch("batch_1") == one
    f = file_record("file-1", request_id="up\x00load")
    f.model = "gpt\x00x"
    await store.insert_file(f)
    assert await store.get_file_by_request_id("p", "up\x00load") == f
    for odd in ("batch_1\x00", "\x00", "batch_\x00\r\n\ufeff\u202e"):
        assert await store.get_batch(odd) is None and await store.get_file(odd) is None
        assert await store.active_batch_reading(odd) is None and await store.delete_file(odd) is False
        assert await store.find_api_key(odd) is None
        assert await store.list_batches(odd, (), 10, None) == [] and await store.list_files(odd, None, 10, None) == []
        assert await store.list_batches(None, (), 10, (NOW + 1, odd)) != []


async def test_ledger_groups_come_in_byte_order_whatever_the_characters(database):
    """UTF-8 byte order (SQLite's text order) on every backend, whatever the database's locale,
    and the cursor pages through the groups one at a time."""
    values = ["é", "b", "a ", "a!", "a", "\U0001f600", "Z"]
    for i, v in enumerate(values):
        await end_batch(database.metadata, f"batch_{i}", ledger_row(f"batch_{i}", model=v, metadata={"k": v}))
    ordered = sorted(values, key=str.encode)
    assert ordered == ["Z", "a", "a ", "a!", "b", "é", "\U0001f600"]
    for dim, name in ((Dimension("metadata", "k"), "metadata.k"), (Dimension("model"), "model")):
        groups = await database.ledger.aggregate(LedgerFilter(), [dim], limit=100)
        assert [g.group[name] for g in groups] == ordered
        pages, after = [], None
        while page := await database.ledger.aggregate(LedgerFilter(), [dim], limit=1, after=after):
            pages.append(page[0].group[name])
            after = json.loads(json.dumps(page[0].sort_key))  # as a page token carries it
        assert pages == ordered


async def test_ledger_metadata_holding_nul_groups_apart(database_backend, database, request):
    if database_backend.name == "sqlite":
        request.applymarker(pytest.mark.xfail(strict=True, reason="SQLite's json_each cuts a value at U+0000:"
                                              " 'a\\x00' is grouped with 'a'"))
    for batch_id, meta in (("batch_1", {"k": "a"}), ("batch_2", {"k": "a\x00"}), ("batch_3", {"k\x00": "v"})):
        await end_batch(database.metadata, batch_id, ledger_row(batch_id, metadata=meta))
    groups = await database.ledger.aggregate(LedgerFilter(), [Dimension("metadata", "k")], limit=100)
    assert [(g.group, g.batch_count) for g in groups] == [
        ({}, 1), ({"metadata.k": "a"}, 1), ({"metadata.k": "a\x00"}, 1)]
    [_, odd] = await database.ledger.aggregate(LedgerFilter(), [Dimension("metadata", "k\x00")], limit=100)
    assert odd.group == {"metadata.k\x00": "v"}


async def test_ledger_filters_no_stored_text_can_match_match_nothing(database):
    await end_batch(database.metadata, "batch_1", ledger_row("batch_1"))
    for f in (LedgerFilter(model="m\x00"), LedgerFilter(project="p\x00"), LedgerFilter(provider="\x00")):
        assert (await database.ledger.totals(f)).batch_count == 0

# -- webhooks: endpoints and the outbox ------------------------------------------------------


def outbox_event(event_id: str, batch_id: str, *, endpoint_id: str = "wh_1", due: float = NOW) -> OutboxEvent:
    return OutboxEvent(event_id=event_id, endpoint_id=endpoint_id, project="p", batch_id=batch_id,
                       event_type="batch.completed", body=f'{{"id":"{event_id}"}}', created_at=NOW,
                       next_attempt_at=due)


async def end_with_events(store, batch_id: str, events: list[OutboxEvent]) -> None:
    b = batch_record(batch_id)
    await store.insert_batch(b)
    b.status = BatchStatus.COMPLETED
    await store.update_batch(b, outbox=events)


async def test_webhook_endpoints_round_trip_by_project(database):
    store = database.metadata
    a = WebhookEndpoint(id="wh_a", project="p", url="https://a.example/hook", secret="whsec_AAAA",
                        events=("batch.completed",), created_at=NOW)
    b = WebhookEndpoint(id="wh_b", project="q", url="https://b.example/hook", secret="whsec_BBBB", created_at=NOW + 1)
    await store.add_webhook_endpoint(a)
    await store.add_webhook_endpoint(b)
    with pytest.raises(Duplicate):
        await store.add_webhook_endpoint(a)
    assert await store.get_webhook_endpoint("wh_a") == a
    assert await store.list_webhook_endpoints("p") == [a]
    assert await store.list_webhook_endpoints(None) == [a, b]
    assert await store.delete_webhook_endpoint("wh_a") is True
    assert await store.delete_webhook_endpoint("wh_a") is False
    assert await store.get_webhook_endpoint("wh_a") is None


async def test_outbox_rows_are_written_with_the_terminal_transaction_only(database):
    store = database.metadata
    b = batch_record("batch_conflict")
    await store.insert_batch(b)
    stale = dataclasses.replace(b, status=BatchStatus.COMPLETED)
    b.status = BatchStatus.IN_PROGRESS
    await store.update_batch(b)
    with pytest.raises(RevisionConflict):  # a lost compare-and-set writes no event either
        await store.update_batch(stale, outbox=[outbox_event("evt_lost", "batch_conflict")])
    assert await store.outbox_events("batch_conflict") == []
    await end_with_events(store, "batch_1", [outbox_event("evt_1", "batch_1"),
                                             outbox_event("evt_1", "batch_1", endpoint_id="wh_2")])
    assert [(e.event_id, e.endpoint_id) for e in await store.outbox_events("batch_1")] == [
        ("evt_1", "wh_1"), ("evt_1", "wh_2")]


async def test_a_claimed_event_is_not_claimed_again_until_its_lease_ends(database_backend, database):
    store, other = database.metadata, (await database_backend.open()).metadata
    await end_with_events(store, "batch_1", [outbox_event("evt_1", "batch_1"),
                                             outbox_event("evt_later", "batch_1", endpoint_id="wh_2", due=NOW + 50)])
    claims = await asyncio.gather(store.claim_outbox("a", NOW, 30, 10), other.claim_outbox("b", NOW, 30, 10))
    assert sorted(len(c) for c in claims) == [0, 1]  # one replica won the due event, the later one is not due
    [won] = [c for c in claims if c][0]
    assert (won.event_id, won.body) == ("evt_1", '{"id":"evt_1"}')
    assert await other.claim_outbox("b", NOW + 29, 30, 10) == []
    # The lease ran out (the claimer died): another replica takes it, with the later event now due.
    retaken = await other.claim_outbox("b", NOW + 60, 30, 10)
    assert [e.event_id for e in retaken] == ["evt_1", "evt_later"]


async def test_a_failed_attempt_is_due_again_at_its_retry_time_and_gives_up_at_none(database):
    store = database.metadata
    await end_with_events(store, "batch_1", [outbox_event("evt_1", "batch_1")])
    [e] = await store.claim_outbox("a", NOW, 30, 10)
    await store.outbox_failed(e.event_id, e.endpoint_id, "someone-else", "HTTP 500", NOW + 5, NOW)  # not the owner
    await store.outbox_failed(e.event_id, e.endpoint_id, "a", "HTTP 500", NOW + 5, NOW)
    assert await store.claim_outbox("a", NOW + 4, 30, 10) == []
    [again] = await store.claim_outbox("a", NOW + 5, 30, 10)
    assert (again.attempts, again.last_error) == (1, "HTTP 500")
    await store.outbox_failed(e.event_id, e.endpoint_id, "a", "timed out", None, NOW + 6)
    [stored] = await store.outbox_events("batch_1")
    assert (stored.attempts, stored.given_up_at, stored.delivered_at) == (2, NOW + 6, None)
    assert await store.claim_outbox("a", NOW + 10_000, 30, 10) == []


async def test_a_delivered_event_is_never_claimed_again_and_ignores_late_failures(database):
    store = database.metadata
    await end_with_events(store, "batch_1", [outbox_event("evt_1", "batch_1")])
    [e] = await store.claim_outbox("a", NOW, 30, 10)
    await store.outbox_delivered(e.event_id, e.endpoint_id, NOW + 1)
    await store.outbox_failed(e.event_id, e.endpoint_id, "a", "late", NOW + 2, NOW + 2)
    [stored] = await store.outbox_events("batch_1")
    assert (stored.delivered_at, stored.attempts, stored.last_error, stored.given_up_at) == (NOW + 1, 1, "", None)
    assert await store.claim_outbox("b", NOW + 10_000, 30, 10) == []


# -- sharded batches (domain/shards.py) ----------------------------------------------------


def shards_of(parent: BatchRecord, n: int) -> list[BatchRecord]:
    shards = []
    for i in range(1, n + 1):
        s = batch_record(f"{parent.id}_s{i}", project=parent.project, created_at=parent.created_at)
        s.parent_id = parent.id
        s.selection = ShardSelection(endpoint=s.endpoint, model="m", start=(i - 1) * 10, end=i * 10,
                                     byte_offset=(i - 1) * 1000, single_group=True)
        shards.append(s)
    return shards


async def test_a_split_inserts_the_shards_with_the_parents_move_in_one_transaction(database):
    store = database.metadata
    parent = batch_record("batch_p")
    parent.plan = [PlannedPart(endpoint=parent.endpoint, model="m", deployment_id="d", start=0, end=30)]
    await store.insert_batch(parent, owner="A")
    moved = copy.deepcopy(parent)
    moved.status = BatchStatus.IN_PROGRESS
    moved.shards = [ShardSummary(id=s.id, endpoint=s.endpoint, model="m", provider="openai", deployment_id="d")
                    for s in shards_of(parent, 3)]
    done = await store.split_batch(moved, shards_of(parent, 3), owner="A")
    assert done.revision == 2
    stored = await store.get_batch("batch_p")
    assert stored.status is BatchStatus.IN_PROGRESS and [s.id for s in stored.shards] == [
        "batch_p_s1", "batch_p_s2", "batch_p_s3"]
    shard = await store.get_batch("batch_p_s2")
    assert shard.parent_id == "batch_p" and shard.selection == shards_of(parent, 3)[1].selection
    assert await store.owned_batches("A") == {"batch_p": 2, "batch_p_s1": 1, "batch_p_s2": 1, "batch_p_s3": 1}
    # A stale parent revision: RevisionConflict, and no shard is inserted.
    stale = copy.deepcopy(parent)
    with pytest.raises(RevisionConflict):
        await store.split_batch(stale, shards_of(batch_record("batch_q"), 2), owner="A")
    assert stale.revision == 1 and await store.get_batch("batch_q_s1") is None


async def test_a_split_by_a_replica_that_lost_the_parent_writes_nothing(database):
    store = database.metadata
    parent = batch_record("batch_p")
    await store.insert_batch(parent, owner="B")
    with pytest.raises(LeaseLost):
        await store.split_batch(copy.deepcopy(parent), shards_of(parent, 2), owner="A")
    assert await store.get_batch("batch_p_s1") is None and (await store.get_batch("batch_p")).revision == 1


async def test_shards_are_not_listed_nor_counted_as_unfinished_batches(database):
    store = database.metadata
    parent = batch_record("batch_p")
    await store.insert_batch(parent, owner="A")
    moved = copy.deepcopy(parent)
    moved.status = BatchStatus.IN_PROGRESS
    await store.split_batch(moved, shards_of(parent, 3), owner="A")
    assert [b.id for b in await store.list_batches("p", (), 10, None)] == ["batch_p"]
    assert [b.id for b in await store.list_batches(None, (BatchStatus.VALIDATING,), 10, None)] == []
    assert await store.count_unfinished_batches("p") == 1
    assert {b.id for b in await store.active_batches()} == {"batch_p", "batch_p_s1", "batch_p_s2", "batch_p_s3"}


async def test_a_sharded_batch_counts_once_in_the_ledger_with_every_shards_tokens(database):
    store = database.metadata
    for i in (1, 2, 3):
        row = ledger_row(f"batch_p_s{i}", tokens=(10, 0, 5, 0), nanos=100)
        row["parent_batch_id"] = "batch_p"
        await end_batch(store, f"batch_p_s{i}", row)
    await end_batch(store, "batch_x", ledger_row("batch_x", tokens=(1, 0, 1, 0), nanos=1))
    t = await database.ledger.totals(LedgerFilter())
    assert (t.batch_count, t.input_tokens, t.output_tokens, t.cost_nanos) == (2, 31, 16, 301)
    [group] = await database.ledger.aggregate(LedgerFilter(project="p"), [Dimension("model")], 10)
    assert group.batch_count == 2

# -- limited inserts (quotas reserved atomically) ------------------------------------------


async def test_a_limited_insert_is_checked_with_the_insert_and_writes_nothing_past_the_limit(database):
    store = database.metadata
    await store.insert_batch(batch_record("batch_1"), max_unfinished=2)
    await store.insert_batch(batch_record("batch_done", status=BatchStatus.COMPLETED), max_unfinished=2)
    await store.insert_batch(batch_record("batch_2"), max_unfinished=2)  # an ended batch does not count
    with pytest.raises(QuotaReached) as caught:
        await store.insert_batch(batch_record("batch_3"), max_unfinished=2)
    assert caught.value.current == 2 and await store.get_batch("batch_3") is None
    await store.insert_batch(batch_record("batch_other", project="q"), max_unfinished=2)  # per project

    await store.insert_file(file_record("file-1"), max_stored_bytes=246)  # 123 bytes each
    await store.insert_file(file_record("file-2"), max_stored_bytes=246)
    with pytest.raises(QuotaReached) as caught:
        await store.insert_file(file_record("file-3"), max_stored_bytes=246)
    assert caught.value.current == 246 and await store.get_file("file-3") is None
    await store.insert_batch(batch_record("batch_4", project="q", request_id="r"), max_unfinished=5)
    with pytest.raises(Duplicate):  # a taken request_id is still Duplicate, not the quota
        await store.insert_batch(batch_record("batch_5", project="q", request_id="r"), max_unfinished=5)


async def test_limited_inserts_of_two_replicas_at_once_never_pass_the_limit(database, database_backend):
    stores = [database.metadata, (await database_backend.open()).metadata]  # two replicas, one database
    results = await asyncio.gather(*(stores[i % 2].insert_batch(batch_record(f"batch_{i}"), max_unfinished=3)
                                     for i in range(12)), return_exceptions=True)
    assert sum(r is None for r in results) == 3
    assert all(isinstance(r, QuotaReached) and r.current == 3 for r in results if r is not None)
    assert await stores[1].count_unfinished_batches("p") == 3
