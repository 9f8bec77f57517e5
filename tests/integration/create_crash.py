"""The crash harness of every remote path: kill -9 of the real server (a subprocess) while its create
calls are at the provider. The fake's CreateGate (tests/fakes/consistency.py) holds every create
answer (the jobs exist already), the test kills the server once the creates have arrived, lets the
answers go to the dead connections, restarts the server on the same data directory and watches
every batch to its end. A provider's crash test is its fake, its config entry, one call of
`kill_during_create`, `assert_each_answered_once` and its own count of provider jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from batchgate.v1 import batch_pb2
from tests.conftest import jsonl, upload_requests
from tests.fakes.consistency import CreateGate
from tests.integration.batch_helpers import results, watch_all
from tests.integration.test_crash_recovery import Caller, free_port, start_server


@dataclasses.dataclass
class Outcome:
    batch: batch_pb2.Batch  # its final state
    out: list[dict]
    err: list[dict]
    ledger_rows: int


async def kill_during_create(tmp_path: Path, config: Path, gate: CreateGate, inputs: list[list[dict]],
                             before_stop: Callable[[], Awaitable[None]] | None = None,
                             in_flight: int | None = None) -> list[Outcome]:
    """One batch per entry of `inputs`; the server is killed while `in_flight` creates (default: all
    of them; 1 for a provider whose creates the server sends one at a time) are held at the provider.
    `before_stop` runs once every batch has ended, while the restarted server still runs."""
    data_dir, port = tmp_path / "data", free_port()
    proc, channel = await start_server(port, data_dir, config)
    try:
        caller = Caller(channel)
        gate.hold()
        ids = []
        for lines in inputs:
            f = (await caller.files.UploadFile(upload_requests(jsonl(lines)), metadata=caller.metadata)).file
            ids.append((await caller.batches.CreateBatch(batch_pb2.CreateBatchRequest(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
                metadata=caller.metadata)).batch.id)
        await gate.arrived(len(inputs) if in_flight is None else in_flight)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await channel.close()
        gate.release()  # the provider answers, to a dead connection

        proc, channel = await start_server(port, data_dir, config)
        caller = Caller(channel)
        finals = [states[-1] for states in await asyncio.gather(*(watch_all(caller, i) for i in ids))]
        outcomes = [Outcome(final, *await results(caller, final), 0) for final in finals]
        if before_stop is not None:
            await before_stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        await channel.close()
    with sqlite3.connect(data_dir / "batchgate.sqlite3") as db:
        for o in outcomes:
            o.ledger_rows = db.execute("SELECT count(*) FROM usage_ledger WHERE batch_id=?",
                                       (o.batch.id,)).fetchone()[0]
    return outcomes


def assert_each_answered_once(outcomes: list[Outcome], inputs: list[list[dict]]) -> None:
    for o, lines in zip(outcomes, inputs):
        assert o.batch.status == batch_pb2.BATCH_STATUS_COMPLETED, (o.batch.id, o.batch.errors)
        assert sorted(x["custom_id"] for x in o.out + o.err) == sorted(x["custom_id"] for x in lines)
        assert o.ledger_rows == 1, f"batch {o.batch.id} billed {o.ledger_rows} times"
