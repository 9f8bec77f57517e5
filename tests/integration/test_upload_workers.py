"""Uploads validated in worker processes (--upload-workers, core/upload_validation.py): the same
verdicts as on the event loop, workers shared by concurrent uploads, and the upload's guarantees
(nothing stored without finish, no temporary file left) when a worker dies or an upload is cut."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import grpc
import pytest

from batchgate.v1 import file_pb2
from tests.backends import stored_blobs, uploads_in_flight
from tests.conftest import UPLOAD_FINISH, batch_file, error_details, jsonl, request_line, serving, start_harness

CHUNK = 4096


def _pids(h) -> list[int]:
    return h.server.files.validation_workers.pids()


async def _verdict(h, content: bytes, chunk_size: int = CHUNK):
    """("ok", line_count) or (code, reason, field violations) of an upload of `content`."""
    try:
        f = await h.upload(h.alice, content, chunk_size=chunk_size)
        return "ok", f.line_count, f.model
    except grpc.aio.AioRpcError as err:
        info, bad = error_details(err)
        return (err.code(), info.reason, dict(info.metadata),
                [(v.field, v.description) for v in bad.field_violations], err.details())


# Problems in every part of a file and across chunk boundaries: lines of ~100 bytes, 4 KiB chunks.
MIXED_BAD = (batch_file(300) + jsonl([request_line("req-7"), request_line("z", model="other")])
             + b"{not json\n" + b"\n" + '{"custom_id": "\udc00"}'.encode("utf-8", "surrogatepass") + b"\n"
             + b'{"custom_id": "bad \xff byte"}\n' + jsonl([request_line("last")]))


async def test_uploads_of_several_chunks_are_validated_in_a_worker_with_the_verdicts_of_the_loop(tmp_path):
    async with serving(tmp_path / "inline", upload_workers=0) as inline:
        assert inline.server.files.validation_workers is None
        expected = [await _verdict(inline, content) for content in (batch_file(500), MIXED_BAD)]
    assert expected[0] == ("ok", 500, "gpt-4o-mini")
    assert expected[1][1] == "INVALID_BATCH_FILE"
    async with serving(tmp_path / "workers", upload_workers=2) as h:
        assert await _verdict(h, batch_file(3)) == ("ok", 3, "gpt-4o-mini")
        assert _pids(h) == [], "a one-chunk upload is validated on the loop: no worker is started"
        assert [await _verdict(h, content) for content in (batch_file(500), MIXED_BAD)] == expected
        assert len(_pids(h)) == 1
        assert h.server.files.validation_workers.open_uploads() == 0


async def test_concurrent_uploads_share_the_workers_each_with_its_own_validator(tmp_path):
    async with serving(tmp_path / "d", upload_workers=2) as h:
        # The same custom_ids in every upload: a validator shared between two uploads would call
        # them duplicates.
        results = await asyncio.gather(*(_verdict(h, batch_file(400 + i)) for i in range(6)))
        assert results == [("ok", 400 + i, "gpt-4o-mini") for i in range(6)]
        assert 1 <= len(_pids(h)) <= 2
        assert h.server.files.validation_workers.open_uploads() == 0


def _large_file(n: int, bad: bool) -> bytes:
    """n lines of ~1.1 KB (several times the ring a worker reads from); with `bad`, problems near its end."""
    lines = [request_line(f"big-{i}", content=f"{i} " + "lorem ipsum " * 90) for i in range(n)]
    content = jsonl(lines)
    if bad:
        content += jsonl([request_line("big-17"), request_line("tail")]) + b"{not json\n" + jsonl([request_line("end")])
    return content


async def test_uploads_larger_than_the_ring_in_uneven_chunks_keep_their_bytes_in_order(tmp_path):
    # Chunks that do not divide the ring are skipped past its end, and the loop waits for the
    # worker to take pieces: a piece written over before it was read, or read from the wrong place,
    # would change the verdicts. Two uploads at once share the one worker's ring.
    from batchgate_server.core.upload_validation import RING_BYTES
    files = [_large_file(8000, bad=False), _large_file(8001, bad=True)]
    assert all(len(f) > 2 * RING_BYTES for f in files)
    chunk = 700_001
    async with serving(tmp_path / "inline", upload_workers=0) as inline:
        expected = [await _verdict(inline, f, chunk_size=chunk) for f in files]
    assert expected[0] == ("ok", 8000, "gpt-4o-mini")
    assert expected[1][1] == "INVALID_BATCH_FILE"
    async with serving(tmp_path / "workers", upload_workers=1) as h:
        assert list(await asyncio.gather(*(_verdict(h, f, chunk_size=chunk) for f in files))) == expected
        assert await _verdict(h, files[1], chunk_size=RING_BYTES // 3 + 1) == expected[1]
        assert len(_pids(h)) == 1


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _in_chunks(content: bytes) -> tuple[bytes, list[bytes]]:
    return content, [content[i:i + CHUNK] for i in range(0, len(content), CHUNK)]


async def _held_on_its_worker(h):
    """An upload of 300 lines held after 3 chunks, on the server's one worker: (the call, what lets
    it go on, the content, the worker's pid)."""
    content, chunks = _in_chunks(batch_file(300))
    go_on = asyncio.Event()
    call = h.alice.files.UploadFile(_held_upload(chunks, go_on, held_after=3), metadata=h.alice.metadata)
    await _wait_until(lambda: _pids(h) and uploads_in_flight(h.data_dir))
    (pid,) = _pids(h)
    return call, go_on, content, pid


def _held_upload(chunks: list[bytes], go_on: asyncio.Event, held_after: int):
    """An upload that sends `held_after` chunks, waits for `go_on`, then the rest and finish."""
    async def messages():
        yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
            filename="held.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH))
        for i, chunk in enumerate(chunks):
            if i == held_after:
                await go_on.wait()
            yield file_pb2.UploadFileRequest(chunk=chunk)
        yield UPLOAD_FINISH
    return messages()


@pytest.mark.local_stores  # watches the temporary file on local disk
async def test_a_worker_killed_mid_upload_fails_it_as_unavailable_and_the_next_upload_starts_another(tmp_path):
    async with serving(tmp_path / "d", upload_workers=1) as h:
        a = h.alice
        call, go_on, content, pid = await _held_on_its_worker(h)
        os.kill(pid, signal.SIGKILL)
        await _wait_until(lambda: not _pids(h))
        go_on.set()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = error_details(err.value)
        assert info.reason == "VALIDATION_WORKER_LOST" and "nothing was stored" in err.value.details()
        await _wait_until(lambda: not h.server.files.uploads_in_progress() and not uploads_in_flight(h.data_dir))
        assert stored_blobs(h.data_dir) == []
        assert (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files == []

        assert await _verdict(h, content) == ("ok", 300, "gpt-4o-mini")
        assert len(_pids(h)) == 1 and _pids(h) != [pid]


@pytest.mark.local_stores  # watches the temporary files on local disk
async def test_uploads_cut_on_a_worker_leave_nothing_and_the_worker_forgets_them(tmp_path):
    async with serving(tmp_path / "d", upload_workers=1) as h:
        a = h.alice
        content, chunks = _in_chunks(batch_file(300))
        for attempt in range(12):
            never = asyncio.Event()
            call = a.files.UploadFile(_held_upload(chunks, never, held_after=2 + attempt % 5), metadata=a.metadata,
                                      timeout=None if attempt % 2 else 0.3)
            await _wait_until(lambda: h.server.files.validation_workers.open_uploads() == 1)
            if attempt % 2:
                call.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
                await call
            never.set()
            await _wait_until(lambda: not h.server.files.uploads_in_progress() and not uploads_in_flight(h.data_dir))
        assert h.server.files.validation_workers.open_uploads() == 0
        assert stored_blobs(h.data_dir) == []
        assert len(_pids(h)) == 1
        # The same custom_ids again, on the same worker: nothing of the cut uploads is left in it.
        assert await _verdict(h, content) == ("ok", 300, "gpt-4o-mini")


async def test_stopping_the_server_ends_its_workers(tmp_path):
    async with serving(tmp_path / "d", upload_workers=2) as h:
        await asyncio.gather(_verdict(h, batch_file(400)), _verdict(h, batch_file(401)))
        pids = _pids(h)
        assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # exited and reaped
            os.kill(pid, 0)


def _ipc_held() -> tuple[int, int]:
    """The pipes this process (the test server's) holds open, and its mappings of an upload ring."""
    pipes = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            pipes += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    with open("/proc/self/maps") as maps:
        rings = sum("batchgate-upload-ring" in line for line in maps)
    return pipes, rings


def _ring_waiters(h) -> int:
    """Uploads whose loop waits for the worker to free room in its ring."""
    return sum(len([w for w in worker.room if not w.done()]) for worker in h.server.files.validation_workers._workers)


def _streamed(content: bytes, chunk_size: int, go_on: asyncio.Event, held_after: int = 2,
              pause_at: int | None = None, resume: asyncio.Event | None = None):
    """An upload of `content` in `chunk_size` chunks, held after `held_after` of them until `go_on`
    (and, with `pause_at`, once that many bytes are sent, until `resume`: a client that is not
    sending when the server ends the call sees the server's status, not its own failed send)."""
    async def messages():
        yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
            filename="big.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH))
        for i, start in enumerate(range(0, len(content), chunk_size)):
            if i == held_after:
                await go_on.wait()
            if pause_at is not None and start >= pause_at:
                await resume.wait()
            yield file_pb2.UploadFileRequest(chunk=content[start:start + chunk_size])
        yield UPLOAD_FINISH
    return messages()


@contextlib.contextmanager
def _stopped(pid: int):
    """The worker `pid` stopped (SIGSTOP) for the block: it takes no piece from its ring meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.local_stores  # watches the temporary files on local disk
async def test_a_worker_killed_while_uploads_wait_for_ring_room_fails_them_and_leaks_nothing(tmp_path):
    async with serving(tmp_path / "d", upload_workers=1) as h:
        a = h.alice
        assert await _verdict(h, batch_file(3)) == ("ok", 3, "gpt-4o-mini")  # warm: the channel, no worker
        before, stored = _ipc_held(), stored_blobs(h.data_dir)
        content = _large_file(12_000, bad=False)  # ~13 MiB: three times the ring
        go_on, never = asyncio.Event(), asyncio.Event()
        # 6 MB each, then silence: more than the ring holds, so both wait for room.
        calls = [a.files.UploadFile(_streamed(content, 1_500_007, go_on, pause_at=6_000_000, resume=never),
                                    metadata=a.metadata) for _ in range(2)]
        await _wait_until(lambda: h.server.files.validation_workers.open_uploads() == 2)
        (pid,) = _pids(h)
        with _stopped(pid):
            go_on.set()
            await _wait_until(lambda: _ring_waiters(h) == 2)  # the ring is full: both wait for room
            os.kill(pid, signal.SIGKILL)
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_details(err.value)[0].reason == "VALIDATION_WORKER_LOST"
        never.set()
        await _wait_until(lambda: not h.server.files.uploads_in_progress() and not uploads_in_flight(h.data_dir))
        assert stored_blobs(h.data_dir) == stored
        # The lost worker's pipes and its ring's mapping are gone once it is reaped.
        await _wait_until(lambda: _ipc_held() == before)
        assert await _verdict(h, content, chunk_size=1_500_007) == ("ok", 12_000, "gpt-4o-mini")
        assert len(_pids(h)) == 1 and _pids(h) != [pid]


@pytest.mark.local_stores
async def test_an_upload_cancelled_while_waiting_for_ring_room_leaves_the_others_on_the_worker_exact(tmp_path):
    files = [_large_file(6000, bad=True), _large_file(6001, bad=False), _large_file(5999, bad=True)]
    async with serving(tmp_path / "inline", upload_workers=0) as inline:
        expected = [await _verdict(inline, f, chunk_size=999_983) for f in files]
    async with serving(tmp_path / "d", upload_workers=1) as h:
        a = h.alice
        go_on = asyncio.Event()
        calls = [a.files.UploadFile(_streamed(f, 999_983, go_on), metadata=a.metadata) for f in files]
        await _wait_until(lambda: h.server.files.validation_workers.open_uploads() == 3)
        (pid,) = _pids(h)
        with_worker = _ipc_held()
        with _stopped(pid):
            go_on.set()
            await _wait_until(lambda: _ring_waiters(h) == 3)
            calls[1].cancel()  # its pieces already in the ring are taken (and dropped) in turn
            with pytest.raises(asyncio.CancelledError):
                await calls[1]
            await _wait_until(lambda: h.server.files.validation_workers.open_uploads() == 2)
        got = []
        for call in (calls[0], calls[2]):
            try:
                got.append(("ok", (await call).file.line_count))
            except grpc.aio.AioRpcError as err:
                info, bad = error_details(err)
                got.append((err.code(), info.reason, dict(info.metadata),
                            [(v.field, v.description) for v in bad.field_violations], err.details()))
        assert got == [expected[0], expected[2]]
        await _wait_until(lambda: not h.server.files.uploads_in_progress() and not uploads_in_flight(h.data_dir))
        assert stored_blobs(h.data_dir) == []
        assert await _verdict(h, files[1], chunk_size=999_983) == expected[1]
        assert _pids(h) == [pid] and _ipc_held() == with_worker


async def test_many_uploads_in_4_mib_chunks_share_one_ring_with_the_verdicts_of_the_loop(tmp_path):
    files = [_large_file(4000 + i, bad=i % 2 == 1) for i in range(5)]
    sizes = [(4 << 20) - 64, (1 << 20) + 1, (3 << 20) - 7, 700_001, 65_537]
    async with serving(tmp_path / "inline", upload_workers=0, max_chunk_bytes=4 << 20) as inline:
        expected = [await _verdict(inline, f, chunk_size=size) for f, size in zip(files, sizes)]
    async with serving(tmp_path / "d", upload_workers=1, max_chunk_bytes=4 << 20) as h:
        got = await asyncio.gather(*(_verdict(h, f, chunk_size=size) for f, size in zip(files, sizes)))
        assert list(got) == expected
        assert len(_pids(h)) == 1


@pytest.mark.local_stores
async def test_stopping_the_server_while_an_upload_waits_for_a_stopped_worker_kills_it_and_ends(tmp_path, monkeypatch):
    # The worker (SIGSTOP: stopped, as a stuck one would be) never reads its closed stdin to the end:
    # the server's stop waited for it for ever. Now it is killed STOP_SECONDS after (shortened here).
    from batchgate_server.core import upload_validation
    monkeypatch.setattr(upload_validation, "STOP_SECONDS", 0.5)
    h = await start_harness(tmp_path / "d", upload_workers=1)
    try:
        a = h.alice
        go_on, never = asyncio.Event(), asyncio.Event()
        content = _large_file(12_000, bad=False)
        call = a.files.UploadFile(_streamed(content, 1_500_007, go_on, pause_at=6_000_000, resume=never),
                                  metadata=a.metadata)
        await _wait_until(lambda: h.server.files.validation_workers.open_uploads() == 1)
        (pid,) = _pids(h)
        os.kill(pid, signal.SIGSTOP)
        go_on.set()
        await _wait_until(lambda: _ring_waiters(h) == 1)
        await asyncio.wait_for(h.server.stop(grace=0), 20)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        never.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # only if the stop failed to: the test must not leave it
        await h.channel.close()
    assert not uploads_in_flight(h.data_dir)
    assert stored_blobs(h.data_dir) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.local_stores  # watches the temporary file on local disk
async def test_an_answer_the_server_cannot_read_ends_the_worker_and_fails_its_upload_as_unavailable(tmp_path):
    """A frame on the worker's answer pipe that is not one of its answers (written here into the
    pipe itself, through /proc): the worker is killed and reaped, its upload fails UNAVAILABLE, and
    the next upload starts another worker."""
    from batchgate_server.core import validation_process as wire

    async with serving(tmp_path / "d", upload_workers=1) as h:
        a = h.alice
        call, go_on, content, pid = await _held_on_its_worker(h)
        with open(f"/proc/{pid}/fd/1", "wb", buffering=0) as answers:  # the write end of its stdout pipe
            answers.write(wire.FRAME.pack(max(wire.RESULT, wire.FAILED, wire.TAKEN) + 1, 1, 0))
        await _wait_until(lambda: not _pids(h))
        await _wait_until(lambda: not os.path.exists(f"/proc/{pid}"))  # killed, and reaped (no zombie)
        go_on.set()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(err.value)[0].reason == "VALIDATION_WORKER_LOST"
        await _wait_until(lambda: not h.server.files.uploads_in_progress() and not uploads_in_flight(h.data_dir))
        assert stored_blobs(h.data_dir) == []
        assert await _verdict(h, content) == ("ok", 300, "gpt-4o-mini")
        assert len(_pids(h)) == 1 and _pids(h) != [pid]
