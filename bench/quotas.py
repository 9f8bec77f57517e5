"""What the quota checks cost: the stored-bytes sum per upload, the unfinished-batch count and the
monthly ledger sum per CreateBatch, on SQLite with 200,000 file records (one project holding
100,000 of them) and 20,000 ledger rows, against a primary-key read (get_file) as this machine's
ceiling for one store round trip. The sum runs twice: on the covering index (project, bytes) of
migration 5 and with that index dropped, which is what justifies an indexed sum over a maintained
counter (a counter would add a write to every upload, delete and batch output).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from batchgate_server.core.quotas import month_start
from batchgate_server.store.ports import LedgerFilter
from batchgate_server.store.urls import database_url, open_database

FILES = 200_000
BIG_PROJECT_FILES = 100_000
LEDGER_ROWS = 20_000
ROUNDS = 200


async def timed(call, rounds: int = ROUNDS) -> float:
    """Median seconds of `call()`."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def fill(store) -> None:
    rows = [(f"file-{i:08d}", "big" if i < BIG_PROJECT_FILES else f"p{i % 100}", "f.jsonl", "batch", 1000 + i % 777,
             "ab" * 32, 1.7e9 + i) for i in range(FILES)]
    await store.db.execute("BEGIN")
    await store.db.executemany("INSERT INTO files(id, project, filename, purpose, bytes, sha256, created_at)"
                               " VALUES (?,?,?,?,?,?,?)", rows)
    now = time.time()
    await store.db.executemany(
        "INSERT INTO usage_ledger(batch_id, project, api_key_id, model, provider, deployment_id, created_at,"
        " ended_at, input_tokens, cached_tokens, output_tokens, reasoning_tokens, cost_status, cost_amount,"
        " metadata, usage_by_model, cost_nanos) VALUES (?,?,'k','m','p','d',?,?,1,0,1,0,'known','0.001','{}','{}',"
        " 1000000)", [(f"batch_{i}", "big" if i % 2 else f"p{i % 100}", now - i, now - i) for i in range(LEDGER_ROWS)])
    await store.db.execute("COMMIT")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database = await open_database(database_url("", Path(tmp)), Path(tmp))
        store, ledger = database.metadata, database.ledger
        await fill(store)
        ceiling = await timed(lambda: store.get_file("file-00000042"))
        indexed = await timed(lambda: store.stored_bytes("big"))
        small = await timed(lambda: store.stored_bytes("p7"))
        unfinished = await timed(lambda: store.count_unfinished_batches("big"))
        quota = await timed(lambda: store.get_project_quota("big"))
        spend = await timed(lambda: ledger.totals(LedgerFilter(start=month_start(time.time()), project="big")))
        await store.db.execute("DROP INDEX files_project_bytes")
        unindexed = await timed(lambda: store.stored_bytes("big"), rounds=20)
        await database.close()
    print(f"{FILES} file records ({BIG_PROJECT_FILES} in one project), {LEDGER_ROWS} ledger rows; medians:")
    for name, seconds in [("get_file (ceiling: one primary-key read)", ceiling),
                          (f"stored_bytes, {BIG_PROJECT_FILES} files, covering index", indexed),
                          ("stored_bytes, 1000 files, covering index", small),
                          (f"stored_bytes, {BIG_PROJECT_FILES} files, index dropped", unindexed),
                          ("count_unfinished_batches", unfinished), ("get_project_quota", quota),
                          ("monthly ledger sum, 10000 rows", spend)]:
        print(f"  {name:55s} {seconds * 1e3:8.3f} ms  {seconds / ceiling:7.1f}x ceiling")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
