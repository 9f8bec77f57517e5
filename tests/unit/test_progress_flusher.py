"""The executor's shared progress (providers/executor/progress.py ProgressFlusher): stopping the
periodic flush while its segment is being stored.

Seen on PostgreSQL with a sharded batch of 67 executor shards on a loaded machine: a shard's run
crashed with LeaseLost (a Duplicate segment) though its replica held the lease, and the shard, so
the batch, never ended. stop() cancelled the periodic flush while its INSERT was in flight: the
segment was stored, its seq not counted, and the final flush sent the same seq again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from batchgate_server.providers.base import SharedProgress
from batchgate_server.providers.executor import progress as progress_module
from batchgate_server.providers.executor.progress import (
    ERROR_NAME,
    OUTPUT_NAME,
    Flushed,
    ProgressFlusher,
)
from batchgate_server.store.errors import Duplicate


class SlowToAnswer(SharedProgress):
    """A store whose append commits at once and answers only when `answer` is set (a statement
    committed at the database whose reply is late); a seq stored twice is Duplicate, as in the
    real stores (UNIQUE(batch_id, seq))."""

    def __init__(self) -> None:
        self.segments: dict[int, bytes] = {}
        self.answer = asyncio.Event()
        self.stored = asyncio.Event()

    async def append(self, seq: int, writer: str, output: bytes, errors: bytes) -> None:
        if seq in self.segments:
            raise Duplicate(f"segment {seq}")
        self.segments[seq] = output
        self.stored.set()
        await self.answer.wait()

    async def read(self):
        return []

    async def delete(self) -> None:
        self.segments.clear()


async def test_stop_does_not_cut_a_flush_whose_segment_is_being_stored(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(progress_module, "FLUSH_INTERVAL", 0.001)
    line = b'{"custom_id": "a", "response": {}}\n'
    (tmp_path / OUTPUT_NAME).write_bytes(line)
    (tmp_path / ERROR_NAME).write_bytes(b"")
    store = SlowToAnswer()
    flusher = ProgressFlusher(SimpleNamespace(batch_id="b", workdir=tmp_path, progress=store),
                              Flushed("run-1", 0, 0, 0), lambda: (len(line), 0))
    flusher.start()
    await asyncio.wait_for(store.stored.wait(), 10)  # the periodic flush's segment 0 is in the store
    stopping = asyncio.create_task(flusher.stop())
    for _ in range(5):
        await asyncio.sleep(0)
    store.answer.set()  # the database's reply comes
    await asyncio.wait_for(stopping, 10)
    await flusher.flush()  # the run's final flush: nothing new, nothing sent twice
    assert list(store.segments) == [0] and flusher.flushed.seq == 1



class StoresThenFails(SharedProgress):
    """A store whose first append commits its segment and then raises (the database's reply was
    lost: a dropped connection after COMMIT); a seq stored twice is Duplicate, as in the real
    stores."""

    def __init__(self) -> None:
        self.segments: dict[int, tuple[str, bytes, bytes]] = {}
        self.failed = False

    async def append(self, seq: int, writer: str, output: bytes, errors: bytes) -> None:
        if seq in self.segments:
            raise Duplicate(f"segment {seq}")
        self.segments[seq] = (writer, output, errors)
        if not self.failed:
            self.failed = True
            raise ConnectionResetError("the reply to COMMIT was lost")

    async def read(self):
        return [self.segments[seq] for seq in sorted(self.segments)]

    async def delete(self) -> None:
        self.segments.clear()


async def test_an_append_stored_before_it_raised_is_not_sent_again(tmp_path: Path):
    first, second = b'{"custom_id": "a", "response": {}}\n', b'{"custom_id": "b", "response": {}}\n'
    (tmp_path / OUTPUT_NAME).write_bytes(first + second)
    (tmp_path / ERROR_NAME).write_bytes(b"")
    store = StoresThenFails()
    ends = [len(first), 0]
    flusher = ProgressFlusher(SimpleNamespace(batch_id="b", workdir=tmp_path, progress=store),
                              Flushed("run-1", 0, 0, 0), lambda: tuple(ends))
    try:
        await flusher.flush()
    except ConnectionResetError:
        pass
    else:
        raise AssertionError("the first append raises")
    ends[0] += len(second)  # the run wrote another answer before the flush is tried again
    await flusher.flush()  # no Duplicate (LeaseLost for the run): segment 0 is stored, seq 1 is next
    await flusher.flush()
    assert store.segments == {0: ("run-1", first, b""), 1: ("run-1", second, b"")}
    assert (flusher.flushed.seq, flusher.flushed.output) == (2, len(first) + len(second))
