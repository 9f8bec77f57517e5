"""ListFiles and ListBatches stay under the 4 MiB message limit however large the records: a page
stops filling by bytes as well as by count, and its token continues exactly where it stopped.

The records go straight into the store: the API refuses such values now, but a database written
before the bounds existed may hold them."""

from __future__ import annotations

import json
import time

from batchgate.v1 import batch_pb2, file_pb2, usage_pb2, usage_pb2_grpc
from batchgate_server.domain.models import BatchRecord, BatchStatus, FilePurpose, FileRecord

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def newest_first(records) -> list[str]:
    return [r.id for r in sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)]


async def all_pages(list_page) -> list:
    """Every page of a listing at the largest page size, following the tokens."""
    pages, token = [], ""
    while True:
        page = await list_page(token)
        assert page.ByteSize() < MAX_MESSAGE_BYTES
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


async def test_list_batches_pages_by_bytes(harness):
    # 16 pairs of 64-character keys and 512-character values of 4-byte characters: about 34 KB a
    # batch, so 150 of them would make one page of 5 MB.
    metadata = {f"{k:02d}".ljust(64, "k"): "𝄞" * 512 for k in range(16)}
    now = time.time()
    records = []
    for i in range(150):
        created = now - i // 3  # three batches to a timestamp: the keyset's id breaks the ties
        records.append(BatchRecord(
            id=f"batch_big{i:04d}", project="alice", endpoint="/v1/chat/completions", input_file_id="file-x",
            completion_window="24h", status=BatchStatus.COMPLETED, created_at=created, expires_at=created + 86400,
            metadata=metadata))
        await harness.server.store.insert_batch(records[-1])
    a = harness.alice
    pages = await all_pages(lambda token: a.batches.ListBatches(
        batch_pb2.ListBatchesRequest(page_size=1000, page_token=token), metadata=a.metadata))
    assert len(pages) >= 2
    assert [b.id for page in pages for b in page.batches] == newest_first(records)
    assert pages[0].batches[0].metadata == metadata


async def test_list_files_pages_by_bytes_and_shows_an_oversized_record(harness):
    # 600 files with a 5 KB filename and a 100 KB model, shown cut to 4 KiB each (5 MB in all), and
    # one with a 4.5 MB model, larger than a message.
    now = time.time()
    records = [FileRecord(id=f"file-big{i:04d}", project="alice", filename="f" * 5000, purpose=FilePurpose.BATCH,
                          bytes=1, sha256="0" * 64, created_at=now - i // 2, line_count=1,
                          endpoint="/v1/chat/completions", model=f"{i}" + "m" * 100_000) for i in range(600)]
    records.append(FileRecord(id="file-huge", project="alice", filename="huge.jsonl", purpose=FilePurpose.BATCH,
                              bytes=1, sha256="0" * 64, created_at=now - 10, line_count=1,
                              endpoint="/v1/chat/completions", model="M" * 4_500_000))
    for record in records:
        await harness.server.store.insert_file(record)
    a = harness.alice
    pages = await all_pages(lambda token: a.files.ListFiles(
        file_pb2.ListFilesRequest(page_size=1000, page_token=token), metadata=a.metadata))
    assert len(pages) >= 2
    listed = [f for page in pages for f in page.files]
    assert [f.id for f in listed] == newest_first(records)
    huge = next(f for f in listed if f.id == "file-huge")
    assert huge.model.startswith("MMMM") and "truncated, 4500000 bytes" in huge.model
    got = (await a.files.GetFile(file_pb2.GetFileRequest(file_id="file-huge"), metadata=a.metadata)).file
    assert got == huge


async def insert_ledger_row(harness, batch_id: str, model: str, metadata: dict) -> None:
    """A batch that ended with this ledger row, written as a batch's end writes it (on any backend)."""
    now = time.time()
    b = BatchRecord(id=batch_id, project="alice", endpoint="/v1/chat/completions", input_file_id="file-x",
                    completion_window="24h", status=BatchStatus.VALIDATING, created_at=now, expires_at=now + 86400)
    store = harness.server.store
    await store.insert_batch(b)
    b.status = BatchStatus.COMPLETED
    await store.update_batch(b, ledger={
        "batch_id": batch_id, "project": "alice", "api_key_id": "key_a", "model": model, "provider": "openai",
        "deployment_id": "adhoc:" + model, "created_at": now, "ended_at": now, "input_tokens": 1,
        "cached_tokens": 0, "output_tokens": 1, "reasoning_tokens": 0, "cost_status": "known",
        "cost_amount": "0.000000001", "cost_nanos": 1, "metadata": json.dumps(metadata), "usage_by_model": "{}"})


def usage_pages(harness, **fields):
    stub = usage_pb2_grpc.UsageServiceStub(harness.channel)
    return all_pages(lambda token: stub.QueryUsage(usage_pb2.QueryUsageRequest(page_token=token, **fields),
                                                   metadata=harness.alice.metadata))


async def test_query_usage_pages_by_bytes(harness):
    # 500 ledger rows of models with 10 KB names (an ad-hoc "provider/…" model before models were
    # bounded): grouped by model, 5 MB of rows.
    models = [f"openai/{i:04d}" + "m" * 10_000 for i in range(500)]
    for i, model in enumerate(models):
        await insert_ledger_row(harness, f"batch_u{i}", model, {})
    pages = await usage_pages(harness, group_by=[usage_pb2.USAGE_GROUP_BY_MODEL], page_size=1000)
    assert len(pages) >= 2
    assert [row.group["model"] for page in pages for row in page.rows] == sorted(models)
    assert all(page.totals.batch_count == 500 for page in pages)


async def test_query_usage_pages_through_the_longest_metadata_values(harness):
    # CreateBatch takes metadata values of 512 characters, 4-byte ones included: the cursor of a
    # page that ends on one is a long token, still a valid one.
    values = [f"{i}" + "𝄞" * 511 for i in range(3)]
    for i, value in enumerate(values):
        await insert_ledger_row(harness, f"batch_m{i}", "openai/gpt-4o-mini", {"team": value})
    pages = await usage_pages(harness, group_by=[usage_pb2.USAGE_GROUP_BY_METADATA_KEY], metadata_key="team",
                              page_size=1)
    assert [row.group["metadata.team"] for page in pages for row in page.rows] == values
