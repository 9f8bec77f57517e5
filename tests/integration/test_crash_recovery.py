"""kill -9 in the middle of a batch: after a restart every custom_id is answered exactly once,
finished requests are not sent again, and the batch is billed once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from batchgate.v1 import batch_pb2, batch_pb2_grpc, file_pb2_grpc
from tests.conftest import MASTER_KEY, jsonl, request_line, upload_requests
from tests.fakes.openai_compatible_upstream import FakeUpstream
from tests.integration.batch_helpers import output_usage, results, upstream_entry, write_config

pytestmark = pytest.mark.slow

SERVER = str(Path(sys.executable).with_name("batchgate-server"))
CONCURRENCY = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Caller:
    def __init__(self, channel):
        self.files = file_pb2_grpc.FileServiceStub(channel)
        self.batches = batch_pb2_grpc.BatchServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {MASTER_KEY}"),)


async def start_server(port: int, data_dir: Path, config: Path,
                       *flags: str) -> tuple[subprocess.Popen, grpc.aio.Channel]:
    env = dict(os.environ, BATCHGATE_MASTER_KEY=MASTER_KEY)
    proc = subprocess.Popen([SERVER, "--address", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                             "--config", str(config), "--log-level", "WARNING", *flags], env=env)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.wait_for(channel.channel_ready(), 30)
    return proc, channel


async def test_kill_9_mid_batch_then_restart(tmp_path):
    upstream = FakeUpstream()
    await upstream.start()
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-llm", upstream.base_url, max_concurrency=CONCURRENCY)])
    data_dir = tmp_path / "data"
    port = free_port()
    n = 300
    lines = [request_line(f"r-{i}", model="fake-llm", content=f"SLOW:15 question {i}") for i in range(n)]
    proc, channel = await start_server(port, data_dir, config)
    try:
        caller = Caller(channel)
        f = (await caller.files.UploadFile(upload_requests(jsonl(lines)), metadata=caller.metadata)).file
        batch = (await caller.batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
            metadata=caller.metadata)).batch
        seen_before_kill = 0
        async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                                     metadata=caller.metadata):
            if event.WhichOneof("event") == "batch" and event.batch.request_counts.completed >= n // 3:
                seen_before_kill = event.batch.request_counts.completed
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await channel.close()
        sent_before_restart = upstream.requests_total
        assert sent_before_restart < n, "the kill happened mid-batch"

        proc, channel = await start_server(port, data_dir, config)
        caller = Caller(channel)
        final = None
        async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                                     metadata=caller.metadata, timeout=60):
            if event.WhichOneof("event") == "batch":
                final = event.batch
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        out, err = await results(caller, final)
        answered = [line["custom_id"] for line in out + err]
        assert sorted(answered) == sorted(f"r-{i}" for i in range(n)), "every custom_id exactly once"
        assert final.request_counts.completed == len(out) == n
        # The usage counted as answers were written (before the kill, recovered from the results
        # log after it, then the rest) is exactly the usage of the output file.
        assert (final.usage.input_tokens, final.usage.output_tokens) == output_usage(out)
        # At most the requests in flight at the kill were sent twice.
        resent = [i for i in range(n) if upstream.count(f"SLOW:15 question {i}") > 1]
        assert upstream.requests_total - n == len(resent) <= CONCURRENCY
        assert all(upstream.count(f"SLOW:15 question {i}") <= 2 for i in range(n))
        assert seen_before_kill >= n // 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        await channel.close()
        await upstream.stop()
    # Billed once: exactly one ledger row for the batch.
    with sqlite3.connect(data_dir / "batchgate.sqlite3") as db:
        rows = db.execute("SELECT count(*), sum(input_tokens) FROM usage_ledger WHERE batch_id=?",
                          (batch.id,)).fetchone()
    assert rows[0] == 1 and rows[1] == final.usage.input_tokens > 0
