"""The S3 and GCS blob stores against moto's server and gcp-storage-emulator: the blob port's
contract (streamed writes, nothing visible before commit, atomic replace, ranged reads, abort
leaves nothing), their staging and its sweep, and outages turned into StorageUnavailable. The
emulators are inspected directly (boto3, google-cloud-storage) to see what a store left behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from aiohttp import web

from batchgate.v1 import batch_pb2, file_pb2
from batchgate_server.store.blobs.gcs import GcsBlobStore
from batchgate_server.store.blobs.remote import CallLimits
from batchgate_server.store.blobs.s3 import S3BlobStore
from batchgate_server.store.errors import StorageError, StorageFull, StorageUnavailable
from batchgate_server.store.ports import BlobStore
from batchgate_server.store.urls import StoreUrlError, blob_url, open_blob_store
from tests.backends_objects import QUICK_LIMITS, cut_proxy, gcs_store, s3_store
from tests.conftest import batch_file, jsonl, request_line, serving
from tests.integration.batch_helpers import create, results, watch_all

MIB = 1024 * 1024


@dataclass
class Remote:
    """A store on a fresh bucket plus a view of the bucket from outside the store."""

    kind: str
    store: Any
    bucket: str
    emulator: Any

    def objects(self) -> list[str]:
        """Every object name in the bucket, staging included."""
        if self.kind == "s3":
            listing = self.emulator.client().list_objects_v2(Bucket=self.bucket)
            return sorted(o["Key"] for o in listing.get("Contents", ()))
        return sorted(b.name for b in self.emulator.client().list_blobs(self.bucket))

    def pending_uploads(self) -> list[str]:
        if self.kind != "s3":
            return []  # resumable sessions cannot be listed (and are never visible)
        listing = self.emulator.client().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in listing.get("Uploads", ())]

    def put_raw(self, name: str, data: bytes) -> None:
        if self.kind == "s3":
            self.emulator.client().put_object(Bucket=self.bucket, Key=name, Body=data)
        else:
            self.emulator.client().bucket(self.bucket).blob(name).upload_from_string(data)

    def store_at(self, endpoint: str, limits: CallLimits = QUICK_LIMITS) -> Any:
        make = s3_store if self.kind == "s3" else gcs_store
        return make(self.emulator, self.bucket, endpoint=endpoint, limits=limits)


@pytest.fixture(params=["s3", "gcs"])
def remote(request) -> Remote:
    if request.param == "s3":
        return Remote("s3", request.getfixturevalue("s3_blob_store"), request.getfixturevalue("s3_bucket"),
                      request.getfixturevalue("moto_s3"))
    return Remote("gcs", request.getfixturevalue("gcs_blob_store"), request.getfixturevalue("gcs_bucket"),
                  request.getfixturevalue("gcs_emulator"))


def blob(size: int, seed: int = 0) -> bytes:
    """Distinct bytes at every position (so a misplaced range shows)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


async def write_all(store: BlobStore, data: bytes, key: str, chunk: int = MIB) -> int:
    writer = store.open_writer()
    for i in range(0, len(data), chunk):
        await writer.write(data[i:i + chunk])
    return await writer.commit(key)


async def read_all(store: BlobStore, key: str, offset: int = 0, limit: int = 0, chunk_size: int = 64 * 1024) -> bytes:
    pieces = [p async for p in store.read(key, offset, limit, chunk_size)]
    assert all(len(p) <= chunk_size for p in pieces)
    return b"".join(pieces)


async def keys(store: BlobStore) -> list[str]:
    return sorted([k async for k in store.keys()])


async def test_a_streamed_blob_is_invisible_until_commit_then_whole(remote):
    store = remote.store
    data = blob(2 * store.part_size + 12345)
    writer = store.open_writer()
    for i in range(0, len(data), 100_000):
        await writer.write(data[i:i + 100_000])
    assert await keys(store) == []
    assert not await store.exists("file-big")
    assert await writer.commit("file-big") == len(data)
    assert await keys(store) == ["file-big"]
    assert await store.size("file-big") == len(data)
    assert await read_all(store, "file-big") == data
    assert remote.objects() == ["blobs/v1/file-big"]  # the staging object is gone
    assert remote.pending_uploads() == []


async def test_ranged_reads_at_part_boundaries(remote):
    store = remote.store
    part = store.part_size
    data = blob(3 * part + 7)
    await write_all(store, data, "file-r")
    for offset in (0, 1, part - 1, part, part + 1, 2 * part - 1, 2 * part, 3 * part, 3 * part + 6):
        for limit in (1, 2, part, part + 2, 0):
            got = await read_all(store, "file-r", offset, limit, chunk_size=100_000)
            assert got == data[offset:offset + limit if limit else None], (offset, limit)
    assert await read_all(store, "file-r", len(data)) == b""
    assert await read_all(store, "file-r", len(data) + 10, 5) == b""
    assert await read_all(store, "file-r", len(data) - 3, 100) == data[-3:]


async def test_small_and_empty_blobs(remote):
    store = remote.store
    await write_all(store, b"x" * 1000, "file-small")
    writer = store.open_writer()
    assert await writer.commit("file-empty") == 0
    assert await read_all(store, "file-small", 10, 5) == b"xxxxx"
    assert await read_all(store, "file-empty") == b""
    assert await store.size("file-empty") == 0
    assert await keys(store) == ["file-empty", "file-small"]


async def test_abort_mid_way_leaves_no_object_and_no_pending_upload(remote):
    store = remote.store
    writer = store.open_writer()
    await writer.write(blob(2 * store.part_size + 10))  # two parts sent, the third buffered
    assert remote.objects() == []
    await writer.abort()
    await writer.abort()  # twice is fine
    assert remote.objects() == []
    assert remote.pending_uploads() == []
    assert await keys(store) == []
    with pytest.raises(StorageError):
        await writer.write(b"more")


async def test_abort_after_commit_keeps_the_blob(remote):
    store = remote.store
    writer = store.open_writer()
    await writer.write(blob(store.part_size + 1))
    await writer.commit("file-kept")
    await writer.abort()
    assert await store.size("file-kept") == remote.store.part_size + 1
    with pytest.raises(StorageError):
        await writer.commit("file-other")


async def test_commit_replaces_an_existing_blob(remote):
    store = remote.store
    await write_all(store, blob(store.part_size + 5, seed=1), "file-x")
    second = blob(2 * store.part_size + 9, seed=2)
    await write_all(store, second, "file-x")
    assert await read_all(store, "file-x") == second
    await write_all(store, b"short", "file-x")  # a single-request blob replaces a multipart one
    assert await read_all(store, "file-x") == b"short"
    assert await keys(store) == ["file-x"]


async def test_concurrent_writers_to_distinct_keys(remote):
    store = remote.store
    contents = {f"file-c{i}": blob(store.part_size + 1000 * i, seed=i) for i in range(4)}
    writers = {key: store.open_writer() for key in contents}

    async def feed(key: str) -> None:
        data = contents[key]
        for i in range(0, len(data), 300_000):
            await writers[key].write(data[i:i + 300_000])
            await asyncio.sleep(0)  # interleave the writers
        await writers[key].commit(key)

    await asyncio.gather(*(feed(k) for k in contents))
    assert await keys(store) == sorted(contents)
    for key, data in contents.items():
        assert await read_all(store, key) == data


async def test_missing_keys_and_bad_keys(remote):
    store = remote.store
    with pytest.raises(KeyError):
        await read_all(store, "file-none")
    with pytest.raises(KeyError):
        await store.size("file-none")
    assert not await store.exists("file-none")
    assert not await store.delete("file-none")
    await write_all(store, b"abc", "file-d")
    assert await store.delete("file-d")
    assert not await store.exists("file-d")
    for bad in ("", "a/b", ".staging", "../x"):
        with pytest.raises(ValueError):
            await store.exists(bad)
        with pytest.raises(ValueError):
            await store.open_writer().commit(bad)


async def test_keys_lists_only_committed_blobs_under_the_prefix(remote):
    store = remote.store
    remote.put_raw("elsewhere/file-other", b"1")
    remote.put_raw("blobs/v1/.staging/leftover", b"2")
    remote.put_raw("blobs/v1/nested/file-deeper", b"3")
    remote.put_raw("blobs/v10-file-near", b"4")
    await write_all(store, b"mine", "file-mine")
    assert await keys(store) == ["file-mine"]


async def test_the_sweep_removes_what_a_crashed_writer_left_under_our_prefix_only(remote):
    store = remote.store
    remote.put_raw("blobs/v1/.staging/crashed-after-complete", b"left over")
    remote.put_raw("other/.staging/not-ours", b"keep")
    if remote.kind == "s3":
        s3 = remote.emulator.client()
        s3.create_multipart_upload(Bucket=remote.bucket, Key="blobs/v1/.staging/crashed-mid-upload")
        s3.create_multipart_upload(Bucket=remote.bucket, Key="other/.staging/not-ours-either")
    await write_all(store, b"committed", "file-live")  # (opening a writer starts a sweep too)
    await store.sweep_stale_uploads(older_than=0)
    assert remote.objects() == ["blobs/v1/file-live", "other/.staging/not-ours"]
    assert remote.pending_uploads() == (["other/.staging/not-ours-either"] if remote.kind == "s3" else [])
    assert await store.sweep_stale_uploads() == 0


async def test_opening_a_writer_sweeps_stale_uploads_in_the_background(moto_s3, s3_blob_store, s3_bucket):
    s3 = moto_s3.client()
    # Staging names carry their start (unix seconds): this one is from 2001.
    s3.create_multipart_upload(Bucket=s3_bucket, Key="blobs/v1/.staging/1000000000-crashed-mid-upload")
    live = s3_blob_store.open_writer()
    await live.write(blob(s3_blob_store.part_size + 1))  # a live upload (moto dates it 2010): kept
    for _ in range(500):
        uploads = [u["Key"] for u in s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", ())]
        if "blobs/v1/.staging/1000000000-crashed-mid-upload" not in uploads:
            break
        await asyncio.sleep(0.01)
    assert len(uploads) == 1 and uploads[0] != "blobs/v1/.staging/1000000000-crashed-mid-upload"
    await live.commit("file-live")
    assert await keys(s3_blob_store) == ["file-live"]


async def test_an_outage_mid_read_is_storage_unavailable(remote):
    data = blob(3 * remote.store.part_size)
    await write_all(remote.store, data, "file-o")
    async with cut_proxy(remote.emulator.url) as proxy:
        store = remote.store_at(proxy.url)
        try:
            proxy.cut_after(len(data) // 2)  # half the body arrives, then the store is gone
            got = bytearray()
            with pytest.raises(StorageUnavailable):
                async for piece in store.read("file-o", chunk_size=64 * 1024):
                    got += piece
            assert 0 < len(got) < len(data) and data.startswith(got)
        finally:
            await store.close()


async def test_a_read_broken_once_resumes_where_it_stopped(remote):
    data = blob(3 * remote.store.part_size + 3)
    await write_all(remote.store, data, "file-resume")
    async with cut_proxy(remote.emulator.url) as proxy:
        store = remote.store_at(proxy.url)
        try:
            proxy.break_after(len(data) // 3)  # the connection drops mid-body; a new one works
            assert await read_all(store, "file-resume") == data
            assert proxy.dropped  # it did break mid-body
        finally:
            await store.close()


async def test_an_outage_mid_write_is_storage_unavailable_and_leaves_nothing(remote):
    async with cut_proxy(remote.emulator.url) as proxy:
        store = remote.store_at(proxy.url)
        try:
            writer = store.open_writer()
            await writer.write(blob(store.part_size + 10))  # the first part is on its way
            proxy.cut()
            with pytest.raises(StorageUnavailable):
                for _ in range(8):
                    await writer.write(blob(store.part_size))
                await writer.commit("file-w")
            await proxy.restore()
            assert await keys(store) == []
            # The abort could not reach the store during the outage: the sweep removes the rest.
            await store.sweep_stale_uploads(older_than=0)
            assert remote.objects() == []
            assert remote.pending_uploads() == []
        finally:
            await store.close()


@pytest.mark.parametrize("kind", ["s3", "gcs"])
async def test_a_dead_endpoint_is_storage_unavailable_on_every_call(kind, moto_s3, gcs_emulator, unused_tcp_port):
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    store: Any = (S3BlobStore("bucket-x", "p", endpoint_url=dead, limits=QUICK_LIMITS) if kind == "s3"
                  else GcsBlobStore("bucket-x", "p", endpoint_url=dead, limits=QUICK_LIMITS))
    try:
        with pytest.raises(StorageUnavailable):
            await store.exists("file-a")
        with pytest.raises(StorageUnavailable):
            await read_all(store, "file-a")
        with pytest.raises(StorageUnavailable):
            await keys(store)
        writer = store.open_writer()
        await writer.write(b"small")
        with pytest.raises(StorageUnavailable):
            await writer.commit("file-a")
    finally:
        await store.close()


async def test_blob_urls_open_the_store_for_their_scheme(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHGATE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    s3 = await open_blob_store(blob_url("s3://my-bucket/some/prefix/", tmp_path), tmp_path)
    gs = await open_blob_store(blob_url("gs://other-bucket", tmp_path), tmp_path)
    try:
        assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
        assert isinstance(gs, GcsBlobStore) and (gs.bucket, gs.prefix) == ("other-bucket", "")
    finally:
        await s3.close()
        await gs.close()
    for bad in ("s3:///prefix", "gs://", "s3://user:pw@bucket/p", "s3://bucket:99/p", "gs://b/p?x=1",
                "s3://b/a/../c", "gs://b/.staging", "s3://b/a//c"):
        with pytest.raises(StoreUrlError):
            await open_blob_store(blob_url(bad, tmp_path), tmp_path)


# -- through the server ---------------------------------------------------------------------------


@pytest.fixture(params=["s3", "gcs"])
async def served(request, tmp_path, monkeypatch):
    """A batchgate server whose --blob-url is a fresh bucket on the emulator, and that bucket."""
    if request.param == "s3":
        emulator, bucket = request.getfixturevalue("moto_s3"), request.getfixturevalue("s3_bucket")
        monkeypatch.setenv("BATCHGATE_S3_ENDPOINT_URL", emulator.url)
        url = f"s3://{bucket}/served"
    else:
        emulator, bucket = request.getfixturevalue("gcs_emulator"), request.getfixturevalue("gcs_bucket")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        url = f"gs://{bucket}/served"
    async with serving(tmp_path / "data", blob_url=url) as h:
        yield h, Remote(request.param, None, bucket, emulator)


def long_batch() -> bytes:
    """About 12 MB: more than one 8 MiB part, so a multipart upload or resumable session."""
    return jsonl([request_line(f"req-{i}", content=f"{i} " + "q" * 300) for i in range(30_000)])


async def test_uploads_batches_and_downloads_go_through_the_bucket(served):
    h, remote = served
    content = long_batch()
    assert len(content) > 8 * MIB
    f = await h.upload(h.alice, content, chunk_size=MIB)
    assert remote.objects() == [f"served/{f.id}"]
    downloaded = b"".join([m.data async for m in h.alice.files.DownloadFile(
        file_pb2.DownloadFileRequest(file_id=f.id), metadata=h.alice.metadata)])
    assert downloaded == content

    small = await h.upload(h.alice, batch_file(50))
    batch = await create(h.alice, small.id, model="simulated")
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 50
    out, _ = await results(h.alice, final)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(50))
    assert f"served/{final.output_file_id}" in remote.objects()


async def test_an_upload_refused_mid_way_leaves_nothing_in_the_bucket(served):
    h, remote = served
    content = long_batch() + b"this line is not JSON\n"  # refused once a part was sent
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.upload(h.alice, content, chunk_size=MIB)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert remote.objects() == []
    assert remote.pending_uploads() == []


# -- answers the emulators do not give ------------------------------------------------------------


@contextlib.asynccontextmanager
async def scripted_server(statuses: list[int], body: bytes = b"{}"):
    """An HTTP server answering request n with statuses[n] (200 once the list is used up); yields
    (url, the requests it saw as (method, headers))."""
    seen: list[tuple[str, dict]] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        seen.append((request.method, dict(request.headers)))
        status = statuses[len(seen) - 1] if len(seen) <= len(statuses) else 200
        return web.Response(status=status, body=body if request.method != "HEAD" else None,
                            headers={"Content-Type": "application/json"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def scripted_store(kind: str, url: str) -> Any:
    if kind == "s3":
        return S3BlobStore("bucket-x", "p", endpoint_url=url, limits=QUICK_LIMITS)
    return GcsBlobStore("bucket-x", "p", endpoint_url=url, limits=QUICK_LIMITS)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
async def test_5xx_and_429_are_retried_with_backoff(kind, moto_s3):
    async with scripted_server([503, 429]) as (url, seen):
        store = scripted_store(kind, url)
        try:
            assert await store.exists("file-a")
        finally:
            await store.close()
    assert len(seen) == 3


@pytest.mark.parametrize("kind", ["s3", "gcs"])
async def test_a_store_failing_every_attempt_is_storage_unavailable(kind, moto_s3):
    async with scripted_server([500] * 10) as (url, seen):
        store = scripted_store(kind, url)
        try:
            with pytest.raises(StorageUnavailable, match="HTTP 500 after 3 attempts"):
                await store.exists("file-a")
        finally:
            await store.close()
    assert len(seen) == QUICK_LIMITS.attempts


@pytest.mark.parametrize("kind", ["s3", "gcs"])
async def test_a_full_store_is_storage_full_and_aborts_the_writer(kind, moto_s3):
    async with scripted_server([507] * 10) as (url, seen):
        store = scripted_store(kind, url)
        try:
            writer = store.open_writer()
            await writer.write(b"some bytes")
            with pytest.raises(StorageFull):
                await writer.commit("file-a")
            with pytest.raises(StorageError):
                await writer.write(b"more")  # aborted
        finally:
            await store.close()


async def test_a_refusal_is_a_storage_error_naming_the_answer_not_the_credentials(moto_s3, caplog, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-value")
    caplog.set_level(logging.DEBUG)
    async with scripted_server([403], body=b"<Error><Code>AccessDenied</Code></Error>") as (url, seen):
        store = scripted_store("s3", url)
        try:
            with pytest.raises(StorageError) as err:
                await read_all(store, "file-a")
        finally:
            await store.close()
    assert not isinstance(err.value, StorageUnavailable) and "AccessDenied" in str(err.value)
    signature = seen[0][1]["Authorization"]
    assert signature.startswith("AWS4-HMAC-SHA256 Credential=testing/")
    for text in (str(err.value), caplog.text):
        assert "very-secret-key-value" not in text and signature not in text


async def test_a_blob_beyond_copy_objects_limit_is_copied_in_parts(s3_blob_store, moto_s3, s3_bucket, monkeypatch):
    import batchgate_server.store.blobs.s3 as s3_module

    # CopyObject takes sources up to 5 GiB; shrink the limit to see the multipart copy at work.
    monkeypatch.setattr(s3_module, "COPY_LIMIT", 1)
    monkeypatch.setattr(s3_module, "COPY_PART", 5 * MIB)
    data = blob(2 * s3_blob_store.part_size + 11)
    await write_all(s3_blob_store, data, "file-huge")
    assert await read_all(s3_blob_store, "file-huge") == data
    assert await keys(s3_blob_store) == ["file-huge"]
    etag = moto_s3.client().head_object(Bucket=s3_bucket, Key="blobs/v1/file-huge")["ETag"]
    assert etag.endswith('-3"'), etag  # a multipart object of three 5 MiB copy parts
