"""The hand-written client in clients/python (sync and asyncio) against the real server."""

from __future__ import annotations

import asyncio
import hashlib
import io

import grpc
import pytest

from batchgate import AsyncBatchgateClient, BatchgateClient
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
    content = batch_file(300)
    f = await harness.upload(harness.alice, content)
    dest = tmp_path / "partial.jsonl"
    dest.write_bytes(content[:1000])  # an interrupted earlier download

    def sync_calls():
        # The sync client blocks: it runs on a worker thread, the server on this loop.
        with BatchgateClient(f"127.0.0.1:{harness.port}", api_key=api_key(harness.alice)) as bg:
            written = bg.download_file(f.id, dest)
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
    assert part == content[10:30]
    assert listed == [f.id]
    assert code == grpc.StatusCode.NOT_FOUND
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 300


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
