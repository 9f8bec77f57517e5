"""ResultSink (core/result_files.py) writes its blocks off the loop, one in flight while the next
fills: the file and its sha256 must still be the lines in order, and a failed block write must
surface and leave nothing behind."""

from __future__ import annotations

import hashlib

import pytest

from batchgate_server.core.result_files import ResultSink
from batchgate_server.store.blobs.local import LocalBlobStore, LocalBlobWriter
from batchgate_server.store.errors import StorageFull


async def read_all(store: LocalBlobStore, key: str) -> bytes:
    return b"".join([block async for block in store.read(key)])


async def test_blocks_in_flight_keep_the_lines_order_and_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(ResultSink, "WRITE_BLOCK", 1000)  # many blocks, each overlapping the next lines
    store = await LocalBlobStore.open(tmp_path)
    sink = ResultSink(store)
    lines = [f'{{"custom_id": "c{i}", "text": "{"x" * (i % 97)}"}}'.encode() for i in range(3000)]
    for line in lines:
        await sink.write(line)
    record = await sink.commit("file-out", "p", "out.jsonl", 1.0)
    expected = b"".join(line + b"\n" for line in lines)
    assert await read_all(store, "file-out") == expected
    assert (record.bytes, record.line_count, record.sha256) == (
        len(expected), 3000, hashlib.sha256(expected).hexdigest())


class FullAfter(LocalBlobWriter):
    """A disk that fills after `blocks` block writes."""

    def __init__(self, store: LocalBlobStore, blocks: int) -> None:
        super().__init__(store)
        self.blocks = blocks

    def _write(self, data: bytes) -> None:
        if self.blocks <= 0:
            raise StorageFull("no space left on the device")
        self.blocks -= 1
        super()._write(data)


@pytest.mark.parametrize("blocks", [0, 3])
async def test_a_failed_block_write_surfaces_and_leaves_nothing(tmp_path, monkeypatch, blocks):
    monkeypatch.setattr(ResultSink, "WRITE_BLOCK", 1000)
    store = await LocalBlobStore.open(tmp_path)
    monkeypatch.setattr(store, "open_writer", lambda: FullAfter(store, blocks))
    sink = ResultSink(store)
    with pytest.raises(StorageFull):
        for i in range(5000):
            await sink.write(b'{"line": %d, "pad": "%s"}' % (i, b"y" * 50))
        await sink.commit("file-out", "p", "out.jsonl", 1.0)
    await sink.abort()
    assert [key async for key in store.keys()] == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary file is gone too
