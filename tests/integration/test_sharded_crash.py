"""kill -9 of a real server (a subprocess) at each step of a sharded batch (domain/shards.py):
during the split, after the shards' insert but before any submission, after a shard's job was
created at the provider, and during the merge. After a restart on the same data directory the
batch completes with every custom_id answered exactly once, each shard's provider job created
once, and one ledger row per shard."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from batchgate.v1 import batch_pb2
from tests.conftest import jsonl, request_line, upload_requests
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import results, watch_all
from tests.integration.test_crash_recovery import Caller, free_port, start_server
from tests.integration.test_openai_provider_e2e import openai_entry, write_litellm_config

pytestmark = pytest.mark.slow

N = 60_000
PER_JOB = 20_000


def shard_rows(data_dir: Path, parent_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(data_dir / "batchgate.sqlite3") as db:
        return db.execute("SELECT id, status FROM batches WHERE parent_id=? ORDER BY id", (parent_id,)).fetchall()


def parent_status(data_dir: Path, batch_id: str) -> str:
    with sqlite3.connect(data_dir / "batchgate.sqlite3") as db:
        return db.execute("SELECT status FROM batches WHERE id=?", (batch_id,)).fetchone()[0]


def ledger_rows(data_dir: Path, parent_id: str) -> Counter:
    with sqlite3.connect(data_dir / "batchgate.sqlite3") as db:
        rows = db.execute("SELECT batch_id FROM usage_ledger WHERE parent_batch_id=? OR batch_id=?",
                          (parent_id, parent_id)).fetchall()
    return Counter(r[0] for r in rows)


async def eventually(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("step", ["split", "inserted", "submitted", "merge"])
async def test_kill_9_at_each_step_of_a_sharded_batch(tmp_path, step):
    fake = FakeBatchAPI()
    await fake.start()
    config = write_litellm_config(tmp_path / "models.yaml", [
        openai_entry("gpt-4o-mini", fake, "oai-main", key="sk-test", max_batch_requests=PER_JOB)])
    data_dir, port = tmp_path / "data", free_port()
    flags = ("--max-file-lines", str(N))
    lines = [request_line(f"r-{i}", content=f"question {i}") for i in range(N)]
    proc, channel = await start_server(port, data_dir, config, *flags)
    try:
        caller = Caller(channel)
        f = (await caller.files.UploadFile(upload_requests(jsonl(lines), chunk_size=1 << 20),
                                           metadata=caller.metadata)).file
        if step == "inserted":
            fake.inject(200, 3, path_contains="/files", method="POST", hang=True)  # no job input arrives
        elif step == "submitted":
            fake.gate.hold()  # the first job is created, its answer held
        batch = (await caller.batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
            metadata=caller.metadata)).batch
        # step "split": the split of 60,000 lines has just begun
        if step == "inserted":
            await eventually(lambda: fake.calls_to("POST", "/files") >= 1)
        elif step == "submitted":
            await fake.gate.arrived(1)
        elif step == "merge":
            watcher = caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                                metadata=caller.metadata, timeout=120)
            async for event in watcher:
                if event.WhichOneof("event") == "batch" and event.batch.status == batch_pb2.BATCH_STATUS_FINALIZING:
                    break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await channel.close()
        at_kill = shard_rows(data_dir, batch.id)
        if step == "split":
            assert at_kill == [], "killed after the split had committed"
        elif step == "inserted":
            assert len(at_kill) == 3 and not fake.batches, "killed before the shards' insert or after a submit"
        elif step == "submitted":
            assert len(at_kill) == 3 and fake.batches
        else:
            assert parent_status(data_dir, batch.id) == "finalizing", "killed after the merge had committed"
        fake.gate.release()  # the provider answers, to a dead connection

        proc, channel = await start_server(port, data_dir, config, *flags)
        caller = Caller(channel)
        final = (await watch_all(caller, batch.id, timeout=170))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
        assert [s.request_counts.total for s in final.shards] == [PER_JOB] * 3
        out, err = await results(caller, final)
        assert err == []
        answered = Counter(x["custom_id"] for x in out)
        assert len(answered) == N and set(answered.values()) == {1}
        jobs = Counter((b.metadata or {}).get("batchgate_batch_id") for b in fake.batches.values())
        assert jobs == Counter({s.id: 1 for s in final.shards}), "a shard's job was created twice"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        await channel.close()
        await fake.stop()
    assert ledger_rows(data_dir, batch.id) == Counter({s.id: 1 for s in final.shards})
