"""Object-storage backends for tests: moto's S3 server and gcp-storage-emulator, each started once
per session in its own process (so what a test measures in this process is the store's, not the
emulator's), and blob stores on a fresh bucket per test (`s3_blob_store`, `gcs_blob_store`: the
implementation fixtures of the blob store contract suite). `CutProxy` puts a TCP hop between a
store and its emulator that a test cuts to stage an outage mid-read or mid-write.

Imported by tests/conftest.py, so every test module can ask for these fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from batchgate_server.store.blobs.gcs import GcsBlobStore
from batchgate_server.store.blobs.remote import CallLimits
from batchgate_server.store.blobs.s3 import S3BlobStore

# S3 takes no part under 5 MiB but the last; GCS chunks are multiples of 256 KiB.
S3_TEST_PART = 5 * 1024 * 1024
GCS_TEST_PART = 256 * 1024
# Outages are found out in well under a second.
QUICK_LIMITS = CallLimits(attempts=3, backoff_base=0.01, backoff_cap=0.05, connect_timeout=1.0, io_timeout=5.0)


BIN = Path(sys.executable).parent


class EmulatorProcess:
    """An emulator's command line run in its own process on a free loopback port."""

    def __init__(self, *command: str) -> None:
        self._command = command
        self._proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        import httpx

        from tests.conftest import free_port  # (conftest imports this module)

        port = free_port()
        self._proc = subprocess.Popen([str(BIN / self._command[0]), *self._command[1:], "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url, timeout=1)
                return self.url
            except httpx.HTTPError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"{self._command[0]} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=15)
            self._proc = None


class MotoS3Process(EmulatorProcess):
    def __init__(self) -> None:
        super().__init__("moto_server")

    def client(self, region: str = "us-east-1"):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=region, aws_access_key_id="testing",
                            aws_secret_access_key="testing")


class GcsEmulatorProcess(EmulatorProcess):
    def __init__(self) -> None:
        super().__init__("gcp-storage-emulator", "start", "--in-memory", "--quiet")

    def client(self, project: str = "test-project"):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})


def new_bucket_name() -> str:
    return f"bg-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3Process]:
    server = MotoS3Process()
    server.start()
    with pytest.MonkeyPatch.context() as mp:  # what botocore's credential chain reads
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulatorProcess]:
    emulator = GcsEmulatorProcess()
    emulator.start()
    yield emulator
    emulator.stop()


def s3_store(moto: MotoS3ProcessProcess, bucket: str, endpoint: str = "", prefix: str = "blobs/v1",
             limits: CallLimits = QUICK_LIMITS) -> S3BlobStore:
    return S3BlobStore(bucket, prefix, endpoint_url=endpoint or moto.url, limits=limits, part_size=S3_TEST_PART)


def gcs_store(emulator: GcsEmulatorProcess, bucket: str, endpoint: str = "", prefix: str = "blobs/v1",
              limits: CallLimits = QUICK_LIMITS) -> GcsBlobStore:
    return GcsBlobStore(bucket, prefix, endpoint_url=endpoint or emulator.url, limits=limits,
                        part_size=GCS_TEST_PART)


@pytest.fixture
def s3_bucket(moto_s3: MotoS3Process) -> str:
    bucket = new_bucket_name()
    moto_s3.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulatorProcess) -> str:
    bucket = new_bucket_name()
    gcs_emulator.client().create_bucket(bucket)
    return bucket


@pytest.fixture
async def s3_blob_store(moto_s3: MotoS3Process, s3_bucket: str) -> AsyncIterator[S3BlobStore]:
    store = s3_store(moto_s3, s3_bucket)
    yield store
    await store.close()


@pytest.fixture
async def gcs_blob_store(gcs_emulator: GcsEmulatorProcess, gcs_bucket: str) -> AsyncIterator[GcsBlobStore]:
    store = gcs_store(gcs_emulator, gcs_bucket)
    yield store
    await store.close()


class CutProxy:
    """A loopback TCP proxy to `target` (host, port). `cut()` drops every connection and refuses
    new ones (an outage); `cut_after(n)` does so once n more bytes went from the target to the
    client (exactly there, whatever the socket buffers hold); `break_after(n)` only drops the
    connections then (a network blip: new connections work); `restore()` ends an outage."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._budget: int | None = None
        self._refuse = False
        self.cuts = asyncio.Event()
        self.dropped = 0  # connections dropped mid-transfer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer, False), self._pump(up_reader, writer, True),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, downstream: bool) -> None:
        while data := await reader.read(64 * 1024):
            if downstream and self._budget is not None:
                data = data[:self._budget]
                self._budget -= len(data)
            writer.write(data)
            await writer.drain()
            if downstream and self._budget == 0:
                self.cut() if self._refuse else self._drop()
                return
        writer.close()

    def cut_after(self, n: int) -> None:
        self._budget, self._refuse = n, True

    def break_after(self, n: int) -> None:
        self._budget, self._refuse = n, False

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._drop()

    def _drop(self) -> None:
        self._budget = None
        self.dropped += len(self._writers) // 2
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()
        self.cuts.set()

    async def restore(self) -> None:
        self.cuts.clear()
        await self.start()

    async def stop(self) -> None:
        self.cut()


@contextlib.asynccontextmanager
async def cut_proxy(url: str) -> AsyncIterator[CutProxy]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    proxy = CutProxy(host, int(port))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
