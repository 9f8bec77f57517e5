"""A blob store that goes away (an S3 outage) is UNAVAILABLE STORAGE_UNAVAILABLE with a RetryInfo on
the calls that need it — never UNKNOWN — and the server serves again once it is back."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from batchgate.v1 import file_pb2
from tests.backends_objects import CutProxy
from tests.conftest import batch_file, error_details, serving



@pytest.fixture
async def behind_a_proxy(tmp_path, monkeypatch, moto_s3, s3_bucket):
    """A server whose blobs are in a moto bucket reached through a proxy the test can cut."""
    host, port = moto_s3.url.removeprefix("http://").split(":")
    proxy = CutProxy(host, int(port))
    await proxy.start()
    monkeypatch.setenv("BATCHGATE_S3_ENDPOINT_URL", proxy.url)
    try:
        async with serving(tmp_path / "data", blob_url=f"s3://{s3_bucket}/outage") as h:
            yield h, proxy
    finally:
        await proxy.stop()


def assert_storage_unavailable(err: grpc.aio.AioRpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    info, _ = error_details(err)
    assert info.reason == "STORAGE_UNAVAILABLE" and info.domain == "batchgate.dev"
    retry = [d for d in rpc_status.from_call(err).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "a RetryInfo says when to try again"


async def test_a_blob_store_outage_is_unavailable_and_passes(behind_a_proxy):
    h, proxy = behind_a_proxy
    stored = await h.upload(h.alice, batch_file(3))

    proxy.cut()
    with pytest.raises(grpc.aio.AioRpcError) as upload:
        await h.upload(h.alice, batch_file(3))
    assert_storage_unavailable(upload.value)
    with pytest.raises(grpc.aio.AioRpcError) as download:
        async for _ in h.alice.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=stored.id),
                                                  metadata=h.alice.metadata):
            pass
    assert_storage_unavailable(download.value)
    # Metadata lives in the database, which is fine: reads that need no blob still answer.
    got = await h.alice.files.GetFile(file_pb2.GetFileRequest(file_id=stored.id), metadata=h.alice.metadata)
    assert got.file.id == stored.id

    await proxy.restore()
    content = b"".join([m.data async for m in h.alice.files.DownloadFile(
        file_pb2.DownloadFileRequest(file_id=stored.id), metadata=h.alice.metadata)])
    assert content == batch_file(3)
    assert (await h.upload(h.alice, batch_file(2))).line_count == 2
