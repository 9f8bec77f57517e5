"""Shared fixtures: the real server, in-process on a loopback port, reached through the
generated stubs with real API keys."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from batchgate.v1 import batch_pb2_grpc, file_pb2, file_pb2_grpc
from batchgate_server.app import BatchgateServer
from batchgate_server.core.auth import create_api_key
from batchgate_server.settings import Settings
from tests.backends_objects import (  # noqa: F401  (fixtures: S3 and GCS emulators, blob stores on them)
    gcs_blob_store, gcs_bucket, gcs_emulator, moto_s3, s3_blob_store, s3_bucket,
)
from tests.backends_pg import open_postgres_store, postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.fakes.openai_compatible_upstream import FakeUpstream
from tests.storage_full import SmallDisk

MASTER_KEY = "test-master-key"


@dataclasses.dataclass
class Caller:
    """Stubs plus the metadata of one API key."""

    files: file_pb2_grpc.FileServiceStub
    batches: batch_pb2_grpc.BatchServiceStub
    metadata: tuple[tuple[str, str], ...]
    project: str

    @property
    def api_key(self) -> str:
        """The secret behind `metadata`, for HTTP clients ("" for none)."""
        return next((value.removeprefix("Bearer ") for key, value in self.metadata if key == "authorization"), "")


@dataclasses.dataclass
class Harness:
    server: BatchgateServer
    channel: grpc.aio.Channel
    port: int
    data_dir: Path
    alice: Caller
    bob: Caller
    admin: Caller
    anonymous: Caller

    async def upload(self, caller: Caller, content: bytes, *, filename: str = "requests.jsonl",
                     chunk_size: int = 256 * 1024, **header_fields) -> file_pb2.File:
        return (await caller.files.UploadFile(upload_requests(content, filename=filename, chunk_size=chunk_size,
                                                              **header_fields),
                                              metadata=caller.metadata)).file


def upload_requests(content: bytes, *, filename: str = "requests.jsonl", chunk_size: int = 256 * 1024,
                    purpose: int = file_pb2.FILE_PURPOSE_BATCH, **header_fields):
    yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(filename=filename, purpose=purpose,
                                                                      **header_fields))
    for start in range(0, len(content), chunk_size):
        yield file_pb2.UploadFileRequest(chunk=content[start:start + chunk_size])
    yield UPLOAD_FINISH


UPLOAD_FINISH = file_pb2.UploadFileRequest(finish=file_pb2.UploadFileFinish())


def request_line(custom_id: str, *, model: str = "gpt-4o-mini", url: str = "/v1/chat/completions",
                 content: str = "Hello") -> dict:
    if url == "/v1/embeddings":
        body = {"model": model, "input": content}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def batch_file(n: int, **kw) -> bytes:
    return jsonl([request_line(f"req-{i}", content=f"Question number {i}?", **kw) for i in range(n)])


def make_settings(data_dir: Path, **overrides) -> Settings:
    defaults = dict(address="127.0.0.1:0", data_dir=data_dir, master_key=MASTER_KEY, heartbeat_interval=0.5,
                    grace_period=0.5)
    defaults.update(overrides)
    return Settings(**defaults)


# Which stores the in-process servers run on: "sqlite" (the default: SQLite and local disk in the data
# directory) or "postgres+s3" (a fresh database on the session's PostgreSQL server and a fresh
# moto bucket per data directory; a server restarted on the same data directory finds them again).
TEST_BACKEND = os.environ.get("BATCHGATE_TEST_BACKEND", "sqlite")


class _RemoteStores:
    """PostgreSQL and moto for TEST_BACKEND=postgres+s3: started on first use, stopped at the end."""

    def __init__(self) -> None:
        self.pg = None
        self.moto = None
        self.by_data_dir: dict[Path, dict[str, str]] = {}

    def urls(self, data_dir: Path) -> dict[str, str]:
        from tests.backends_objects import MotoS3Process, new_bucket_name
        from tests.backends_pg import PostgresServer

        if self.pg is None:
            self.pg = PostgresServer.start()
            self.moto = MotoS3Process()
            self.moto.start()
            os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1", "BATCHGATE_S3_ENDPOINT_URL": self.moto.url})
        key = data_dir.resolve()
        if key not in self.by_data_dir:
            bucket = new_bucket_name()
            self.moto.client().create_bucket(Bucket=bucket)
            self.by_data_dir[key] = {"database_url": self.pg.create_database(), "blob_url": f"s3://{bucket}/files"}
        return self.by_data_dir[key]

    def stop(self) -> None:
        if self.pg is not None:
            self.moto.stop()
            self.pg.stop()


_remote_stores = _RemoteStores()


@pytest.fixture(scope="session", autouse=True)
def _stop_remote_stores():
    yield
    _remote_stores.stop()


def backend_overrides(data_dir: Path) -> dict[str, str]:
    """The settings that put a server on data_dir onto TEST_BACKEND's stores."""
    return _remote_stores.urls(data_dir) if TEST_BACKEND == "postgres+s3" else {}


async def start_harness(data_dir: Path, **overrides) -> Harness:
    if "database_url" not in overrides:
        overrides = {**backend_overrides(data_dir), **overrides}
    server = BatchgateServer(make_settings(data_dir, **overrides))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.max_send_message_length", 4 * 1024 * 1024)])
    files = file_pb2_grpc.FileServiceStub(channel)
    batches = batch_pb2_grpc.BatchServiceStub(channel)

    async def caller(project: str) -> Caller:
        _, secret = await create_api_key(server.store, project)
        return Caller(files, batches, (("authorization", f"Bearer {secret}"),), project)

    return Harness(
        server=server, channel=channel, port=port, data_dir=data_dir,
        alice=await caller("alice"), bob=await caller("bob"),
        admin=Caller(files, batches, (("authorization", f"Bearer {MASTER_KEY}"),), "default"),
        anonymous=Caller(files, batches, (), ""),
    )


def free_port() -> int:
    """A loopback port nothing listens on now: for a server that must come back on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stop_harness(h: Harness) -> None:
    await h.channel.close()
    await h.server.stop(grace=0)


@contextlib.asynccontextmanager
async def serving(data_dir: Path, **overrides) -> AsyncIterator[Harness]:
    """A harness for the length of an `async with`, for settings the `harness` fixture does not have."""
    h = await start_harness(data_dir, **overrides)
    try:
        yield h
    finally:
        await stop_harness(h)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path / "data")
    try:
        yield h
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


@pytest.fixture
async def http_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The harness with the OpenAI-compatible HTTP API on too (server.http_port)."""
    async with serving(tmp_path / "data", http_address="127.0.0.1:0") as h:
        yield h


@pytest.fixture
def upstream_class() -> type[FakeUpstream]:
    """The fake OpenAI-compatible server `upstream` runs; a module overrides this for a variant."""
    return FakeUpstream


@pytest.fixture
async def upstream(upstream_class: type[FakeUpstream]) -> AsyncIterator[FakeUpstream]:
    up = upstream_class()
    await up.start()
    try:
        yield up
    finally:
        await up.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs at tmp_path / "disk", unmounted afterwards (see tests/storage_full.py)."""
    with SmallDisk(tmp_path / "disk") as disk:
        yield disk


def error_details(err: grpc.aio.AioRpcError):
    """(ErrorInfo, BadRequest | None) of a rich status."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    info, bad_request = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    assert info is not None, "every error carries an ErrorInfo"
    return info, bad_request
