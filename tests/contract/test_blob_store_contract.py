"""The contract of store.ports.BlobStore, run against every implementation in
tests/contract/backends.py: write/commit/read with ranges and chunking, atomic commit (an aborted
or uncommitted writer leaves nothing visible), replacement, delete/exists/size, missing keys, the
line reader providers use, and a large blob written and read in flat memory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc

import pytest

from batchgate_server.store.ports import LINE_READ_BLOCK

MIB = 1024 * 1024


async def put(blobs, key: str, *parts: bytes) -> int:
    writer = blobs.open_writer()
    for part in parts:
        await writer.write(part)
    return await writer.commit(key)


async def get(blobs, key: str, **kw) -> bytes:
    return b"".join([chunk async for chunk in blobs.read(key, **kw)])


async def keys(blobs) -> set[str]:
    return {k async for k in blobs.keys()}


async def test_a_written_blob_reads_back_whole(blobs):
    data = os.urandom(3 * MIB + 17)
    assert await put(blobs, "file-1", data[:MIB], data[MIB:MIB + 5], data[MIB + 5:]) == len(data)
    assert await get(blobs, "file-1") == data
    assert await blobs.exists("file-1")
    assert await blobs.size("file-1") == len(data)
    assert await keys(blobs) == {"file-1"}


async def test_an_empty_blob_can_be_committed(blobs):
    assert await blobs.open_writer().commit("file-empty") == 0
    assert await get(blobs, "file-empty") == b""
    assert await blobs.size("file-empty") == 0


@pytest.mark.parametrize(("offset", "limit"), [(0, 0), (0, 1), (1, 0), (1000, 10), (4095, 3000), (9999, 0),
                                               (10_000, 0), (10_000, 5), (0, 10_000), (0, 20_000), (5, 9_995)])
async def test_a_range_reads_from_offset_at_most_limit_bytes(blobs, offset, limit):
    data = bytes(range(256)) * 40
    data = data[:10_000]
    await put(blobs, "file-r", data)
    expected = data[offset:offset + limit] if limit else data[offset:]
    assert await get(blobs, "file-r", offset=offset, limit=limit) == expected


@pytest.mark.parametrize("chunk_size", [1, 7, 1024, 64 * 1024])
async def test_reads_come_in_chunks_of_at_most_chunk_size(blobs, chunk_size):
    data = os.urandom(100_000 if chunk_size > 1 else 3000)
    await put(blobs, "file-c", data)
    chunks = [c async for c in blobs.read("file-c", offset=3, chunk_size=chunk_size)]
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert b"".join(chunks) == data[3:]


async def test_a_missing_key_is_a_key_error(blobs):
    with pytest.raises(KeyError):
        await get(blobs, "file-none")
    with pytest.raises(KeyError):
        await blobs.size("file-none")
    assert not await blobs.exists("file-none")
    assert await blobs.delete("file-none") is False


async def test_delete_removes_the_blob(blobs):
    await put(blobs, "file-1", b"x")
    await put(blobs, "file-2", b"y")
    assert await blobs.delete("file-1") is True
    assert not await blobs.exists("file-1")
    assert await keys(blobs) == {"file-2"}
    with pytest.raises(KeyError):
        await get(blobs, "file-1")


async def test_commit_replaces_an_existing_blob(blobs):
    await put(blobs, "file-1", b"first version, longer")
    assert await put(blobs, "file-1", b"second") == 6
    assert await get(blobs, "file-1") == b"second"
    assert await keys(blobs) == {"file-1"}


async def test_an_uncommitted_writer_is_invisible(blobs):
    writer = blobs.open_writer()
    await writer.write(b"not yet" * 1000)
    assert await keys(blobs) == set()
    assert not await blobs.exists("file-1")
    await writer.commit("file-1")
    assert await keys(blobs) == {"file-1"}


async def test_an_aborted_writer_leaves_nothing(blob_backend, blobs):
    staging = blob_backend.staging
    before = await staging(blobs) if staging else None
    writer = blobs.open_writer()
    await writer.write(os.urandom(2 * MIB))
    await writer.abort()
    await writer.abort()  # twice is fine
    assert await keys(blobs) == set()
    if staging:
        assert await staging(blobs) == before
    # An abort after a commit changes nothing.
    committed = blobs.open_writer()
    await committed.write(b"kept")
    await committed.commit("file-kept")
    await committed.abort()
    assert await get(blobs, "file-kept") == b"kept"


async def test_a_writer_cancelled_mid_write_leaves_nothing_once_aborted(blob_backend, blobs):
    staging = blob_backend.staging
    before = await staging(blobs) if staging else None
    writer = blobs.open_writer()
    await writer.write(b"a" * MIB)
    task = asyncio.create_task(writer.write(b"b" * (8 * MIB)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.abort()
    assert await keys(blobs) == set()
    if staging:
        assert await staging(blobs) == before


async def test_a_blob_is_visible_to_another_handle_once_committed(blob_backend, blobs):
    other = await blob_backend.open()
    writer = blobs.open_writer()
    await writer.write(b"shared")
    assert not await other.exists("file-s")
    await writer.commit("file-s")
    assert await get(other, "file-s") == b"shared"
    assert await other.delete("file-s")
    assert not await blobs.exists("file-s")


@pytest.mark.parametrize("key", ["", "a/b", ".hidden", "../x"])
async def test_a_bad_key_is_refused(blobs, key):
    with pytest.raises(ValueError):
        await blobs.open_writer().commit(key)
    with pytest.raises(ValueError):
        await blobs.exists(key)


async def test_lines_are_the_non_blank_lines_without_newlines(blobs):
    long_line = b"x" * (LINE_READ_BLOCK + 10)  # straddles a block boundary
    await put(blobs, "file-l", b"one\r\n\n  \ntwo\n" + long_line + b"\nlast without newline")
    assert [line async for line in blobs.lines("file-l")] == [b"one", b"two", long_line, b"last without newline"]
    with pytest.raises(KeyError):
        [line async for line in blobs.lines("file-none")]


async def test_a_large_blob_is_written_and_read_in_flat_memory(blobs):
    size, block = 64 * MIB, MIB
    pattern = os.urandom(block)
    tracemalloc.start()
    try:
        writer = blobs.open_writer()
        for _ in range(size // block):
            await writer.write(pattern)
        await writer.commit("file-big")
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest, read = hashlib.sha256(), 0
        async for chunk in blobs.read("file-big", chunk_size=block):
            digest.update(chunk)
            read += len(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256()
    for _ in range(size // block):
        expected.update(pattern)
    assert (read, digest.hexdigest()) == (size, expected.hexdigest())
    # A few blocks (and an S3 part, 8 MiB or so) at most, never the blob.
    assert written_peak < 24 * MIB, written_peak
    assert read_peak < 24 * MIB, read_peak
