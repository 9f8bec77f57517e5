"""The hand-written client in clients/python (sync and asyncio) against the real server."""

from __future__ import annotations

import asyncio
import hashlib
import io

import grpc
import pytest

from batchgate import AsyncBatchgateClient, BatchgateClient, FailedPreconditionError, InvalidArgumentError
from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import MASTER_KEY, batch_file, error_details, start_harness
from tests.integration.batch_helpers import create


def api_key(caller) -> str:
    return dict(caller.metadata)["authorization"].removeprefix("Bearer ")


async def test_async_client_full_flow(harness, tmp_path):
    content = batch_file(120)
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
        f = await bg.upload_file(path, chunk_size=4096)
        assert f.sha256 == hashlib.sha256(content).hexdigest() and f.line_count == 120
        from_stream = await bg.upload_file(io.BytesIO(content), filename="stream.jsonl")
        assert from_stream.filename == "stream.jsonl" and from_stream.bytes == len(content)
        assert (await bg.get_file(f.id)).id == f.id
        listed = [x.id async for x in bg.list_files(page_size=1)]
        assert listed == [from_stream.id, f.id]

        batch = await bg.create_batch(f.id, "/v1/chat/completions", model="simulated")
        states = [s async for s in bg.watch(batch.id)]
        assert states[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
        assert (await bg.wait(batch.id)).revision == states[-1].revision
        assert [b.id async for b in bg.list_batches()] == [batch.id]

        out = tmp_path / "out.jsonl"
        size = await bg.download_file(states[-1].output_file_id, out)
        assert size == out.stat().st_size and len(out.read_bytes().splitlines()) == 120
        assert await bg.delete_file(from_stream.id)


async def test_sync_client_resumes_a_partial_download(harness, tmp_path):
    out = _out_dir(tmp_path)
    content = batch_file(300)
    f = await harness.upload(harness.alice, content)
    dest = out / "partial.jsonl"
    dest.write_bytes(b"an old file")
    (out / "partial.jsonl.part").write_bytes(content[:1000])  # an interrupted earlier download

    def sync_calls():
        # The sync client blocks: it runs on a worker thread, the server on this loop.
        with BatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
            written = bg.download_file(f.id, dest, resume=True)
            part = b"".join(bg.iter_file(f.id, offset=10, limit=20))
            listed = [x.id for x in bg.list_files(page_size=2)]
            with pytest.raises(grpc.RpcError) as err:
                bg.get_file("file-nope")
            batch = bg.create_batch(f.id, "/v1/chat/completions", model="simulated")
            final = bg.wait(batch.id)
            return written, part, listed, err.value.code(), final

    written, part, listed, code, final = await asyncio.to_thread(sync_calls)
    assert written == len(content) - 1000
    assert dest.read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == ["partial.jsonl"], "the part was renamed into place"
    assert part == content[10:30]
    assert listed == [f.id]
    assert code == grpc.StatusCode.NOT_FOUND
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 300


def _out_dir(tmp_path):
    """Where downloads go: apart from the harness's data directory, so listings show only them."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def _blob(harness, file_id: str):
    (path,) = (harness.data_dir / "files" / "blobs").rglob(file_id)
    return path


def _sync_download(harness, file_id: str, dest, **kw):
    def run():
        with BatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
            return bg.download_file(file_id, dest, **kw)
    return asyncio.to_thread(run)


async def test_download_replaces_an_old_file_unless_asked_to_resume(harness, tmp_path):
    """A new results file downloaded over an old one (longer or shorter) is exactly the new file."""
    out = _out_dir(tmp_path)
    content = batch_file(50)
    f = await harness.upload(harness.alice, content)
    for old in (b"x" * 10, batch_file(80), content[:100]):
        dest = out / "results.jsonl"
        dest.write_bytes(old)
        assert await _sync_download(harness, f.id, dest) == len(content)
        assert dest.read_bytes() == content
        async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
            dest.write_bytes(old)
            assert await bg.download_file(f.id, dest) == len(content)
        assert dest.read_bytes() == content
        assert [p.name for p in out.iterdir()] == ["results.jsonl"], "no temp file is left"


@pytest.mark.local_stores  # damages the blob on local disk
@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "longer"])
async def test_a_download_that_does_not_match_the_record_leaves_the_old_file(harness, tmp_path, damage):
    """The server's blob is damaged on disk: size or sha256 no longer match the record."""
    out = _out_dir(tmp_path)
    from batchgate import DownloadVerificationError

    content = batch_file(50)
    f = await harness.upload(harness.alice, content)
    blob = _blob(harness, f.id)
    broken = {"flipped_byte": content[:-5] + b"X" + content[-4:], "truncated": content[:-10],
              "longer": content + b"\n"}[damage]
    blob.write_bytes(broken)
    dest = out / "results.jsonl"
    dest.write_bytes(b"the old results")
    with pytest.raises(DownloadVerificationError) as err:
        await _sync_download(harness, f.id, dest)
    assert f.id in str(err.value)
    async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
        with pytest.raises(DownloadVerificationError):
            await bg.download_file(f.id, dest)
    assert dest.read_bytes() == b"the old results"
    assert [p.name for p in out.iterdir()] == ["results.jsonl"]


async def test_a_failed_download_leaves_the_old_file_and_no_temp_file(harness, tmp_path):
    out = _out_dir(tmp_path)
    dest = out / "results.jsonl"
    dest.write_bytes(b"the old results")
    with pytest.raises(grpc.RpcError):
        await _sync_download(harness, "file-nope", dest)
    with pytest.raises(grpc.RpcError):
        await _sync_download(harness, "file-nope", dest, resume=True)
    assert dest.read_bytes() == b"the old results"
    assert [p.name for p in out.iterdir()] == ["results.jsonl"]


async def test_resume_drops_a_part_that_is_not_a_prefix_of_the_file(harness, tmp_path):
    out = _out_dir(tmp_path)
    from batchgate import DownloadVerificationError

    content = batch_file(50)
    f = await harness.upload(harness.alice, content)
    dest = out / "results.jsonl"
    part = out / "results.jsonl.part"
    part.write_bytes(b"Z" * 100)  # the start of some other file
    with pytest.raises(DownloadVerificationError):
        await _sync_download(harness, f.id, dest, resume=True)
    assert not dest.exists() and not part.exists()
    assert await _sync_download(harness, f.id, dest, resume=True) == len(content)
    assert dest.read_bytes() == content
    part.write_bytes(content + b"more")  # longer than the file: cannot be its prefix, starts over
    assert await _sync_download(harness, f.id, dest, resume=True) == len(content)
    assert dest.read_bytes() == content and not part.exists()


async def test_watch_reconnects_across_a_server_restart(tmp_path):
    """The client's watch resumes from the last revision it saw when the stream drops."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    h = await start_harness(data, address=f"127.0.0.1:{port}")
    f = await h.upload(h.admin, batch_file(3000))
    batch = await create(h.admin, f.id, model="simulated")
    seen = []
    async with AsyncBatchgateClient(f"127.0.0.1:{port}", api_key=MASTER_KEY) as bg:
        async def watch():
            async for state in bg.watch(batch.id, reconnect_delay=0.2):
                seen.append(state)

        watcher = asyncio.create_task(watch())
        while not seen:
            await asyncio.sleep(0.01)
        await h.channel.close()
        await h.server.stop(grace=0)  # the stream drops mid-batch
        h2 = await start_harness(data, address=f"127.0.0.1:{port}")
        try:
            await asyncio.wait_for(watcher, 60)
        finally:
            await h2.channel.close()
            await h2.server.stop(grace=0)
    revisions = [s.revision for s in seen]
    assert revisions == sorted(set(revisions)), "no state twice, none out of order"
    assert seen[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    assert seen[-1].request_counts.completed == 3000


async def test_a_stalled_watcher_does_not_slow_the_batch(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(2000))
    batch = await create(a, f.id, model="simulated")
    # A watcher that never reads its stream.
    stalled = a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata)
    first = await stalled.read()
    assert first.batch.id == batch.id
    states = []
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata):
        if event.WhichOneof("event") == "batch":
            states.append(event.batch)
    assert states[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    assert harness.server.hub.watcher_count(batch.id) <= 1
    stalled.cancel()


async def test_deleting_the_input_of_a_running_batch_is_refused(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(3000))
    batch = await create(a, f.id, model="simulated")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=a.metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(err.value)
    assert info.reason == "FILE_IN_USE" and info.metadata["batch_id"] == batch.id
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata):
        pass
    await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=a.metadata)


async def test_sync_client_upload_replays_and_refuses_a_reused_request_id(harness, tmp_path):
    """From a path the client sends expected_sha256, so the replay is answered before the content
    is read: the call must still end cleanly while the client is streaming."""
    out = _out_dir(tmp_path)
    path = out / "in.jsonl"
    path.write_bytes(batch_file(5_000))  # several chunks: still streaming when the answer comes

    def run():
        with BatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
            first = bg.upload_file(path, request_id="r-1")
            again = bg.upload_file(path, request_id="r-1")
            streamed = bg.upload_file(path.read_bytes(), filename="in.jsonl", request_id="r-1")
            with pytest.raises(grpc.RpcError) as err:
                bg.upload_file(batch_file(3), filename="in.jsonl", request_id="r-1")
            return first, again, streamed, err.value

    first, again, streamed, err = await asyncio.to_thread(run)
    assert again == first and streamed == first
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(err)
    assert info.reason == "REQUEST_ID_REUSED" and info.metadata["file_id"] == first.id


async def test_an_upload_whose_source_fails_stores_nothing(harness, tmp_path):
    """The client sends finish only after the last chunk: a source that fails half way (after
    whole lines) aborts the upload instead of committing what was read so far."""
    content = batch_file(2000)

    class FailingHalfWay(io.BytesIO):
        def read(self, size=-1):
            if self.tell() >= len(content) // 2:
                raise OSError("disk went away")
            return super().read(size)

    def run():
        with BatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
            with pytest.raises((grpc.RpcError, OSError)):
                bg.upload_file(FailingHalfWay(content), filename="in.jsonl", chunk_size=4096)
            return list(bg.list_files())

    assert await asyncio.to_thread(run) == []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while harness.server.files.uploads_in_progress():
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert [p for p in (harness.data_dir / "files").rglob("*") if p.is_file()] == []


async def test_create_batch_sends_model_map_and_spread_sync_and_async(harness):
    f = await harness.upload(harness.alice, batch_file(3, model="house-model"))
    address, key = f"127.0.0.1:{harness.port}", api_key(harness.alice)
    async with AsyncBatchgateClient(address, api_key=key) as bg:
        # No endpoint: the file's own.
        mapped = await bg.create_batch(f.id, model_map={"house-model": "simulated"}, spread=True, request_id="a")
        assert (mapped.model, mapped.endpoint) == ("simulated", "/v1/chat/completions")
        with pytest.raises(FailedPreconditionError) as reused:  # spread is part of the request its id names
            await bg.create_batch(f.id, model_map={"house-model": "simulated"}, request_id="a")
        assert (reused.value.reason, reused.value.metadata["field"]) == ("REQUEST_ID_REUSED", "spread")

    def sync_calls():
        with BatchgateClient(address, api_key=key) as bg:
            created = bg.create_batch(f.id, "/v1/chat/completions", model_map={"house-model": "simulated"})
            with pytest.raises(InvalidArgumentError) as refused:
                bg.create_batch(f.id, model_map={"house-model": "no-such-model"})
            return created, refused.value

    created, refused = await asyncio.to_thread(sync_calls)
    assert created.model == "simulated"
    assert refused.reason == "MODEL_NOT_FOUND"
    assert [(v.field, v.description) for v in refused.violations] == [
        ("model_map[house-model]", "lines 1, 2, 3: no deployment serves model 'no-such-model'")]
