"""Several batchgate-server replicas sharing one database and one blob store, as a user runs
them: separate processes with their own --data-dir, the same --database-url and --blob-url.

A backend names the shared stores: `sqlite` (one SQLite file and one directory on this machine)
or `postgres+s3` (tests/backends.py: a throwaway PostgreSQL server and moto)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from batchgate.v1 import batch_pb2_grpc, file_pb2_grpc
from tests.conftest import MASTER_KEY

SERVER = str(Path(sys.executable).with_name("batchgate-server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class SharedStores:
    """What every replica is given: the URLs, extra environment, and a way to ask the database
    one question directly (counting ledger rows)."""

    name: str
    database_url: str
    blob_url: str
    env: dict[str, str]
    scalar: Callable[[str, tuple], object]  # (SQL with ? placeholders, args) -> first column of the first row


def local_stores(root: Path) -> SharedStores:
    """No URLs: one server on its data directory, exactly as without replicas (for comparison)."""
    return SharedStores("local", "", "", {}, lambda sql, args: None)


def sqlite_stores(root: Path) -> SharedStores:
    db = root / "shared.sqlite3"
    (root / "blobs").mkdir(parents=True, exist_ok=True)

    def scalar(sql: str, args: tuple):
        with sqlite3.connect(db) as conn:
            return conn.execute(sql, args).fetchone()[0]

    return SharedStores("sqlite", f"sqlite://{db}", f"file://{root / 'blobs'}", {}, scalar)


def _literal(value) -> str:
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def postgres_scalar(server, url: str) -> Callable[[str, tuple], object]:
    database = url.rsplit("/", 1)[1]

    def scalar(sql: str, args: tuple):
        parts = sql.split("?")
        text = parts[0] + "".join(_literal(a) + rest for a, rest in zip(args, parts[1:]))
        out = server.psql(text, database).strip().splitlines()
        value = out[0] if out else None
        return int(value) if value is not None and value.lstrip("-").isdigit() else value

    return scalar


@contextlib.asynccontextmanager
async def shared_stores(backend: str, root: Path, request=None) -> AsyncIterator[SharedStores]:
    """The shared stores of `backend` ("sqlite" or "postgres+s3"), removed afterwards. Under
    pytest (`request`) the session's PostgreSQL server and moto serve a fresh database and
    bucket; otherwise (benchmarks) both are started here and stopped at the end."""
    if backend == "sqlite":
        yield sqlite_stores(root)
        return
    assert backend == "postgres+s3", backend
    from tests.backends_objects import MotoS3Process, new_bucket_name
    from tests.backends_pg import PostgresServer

    with contextlib.ExitStack() as stack:
        if request is not None:
            pg, moto = request.getfixturevalue("postgres_server"), request.getfixturevalue("moto_s3")
        else:
            pg = PostgresServer.start()
            stack.callback(pg.stop)
            moto = MotoS3Process()
            moto.start()
            stack.callback(moto.stop)
        url = pg.create_database()
        stack.callback(pg.drop_database, url)
        bucket = new_bucket_name()
        moto.client().create_bucket(Bucket=bucket)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "BATCHGATE_S3_ENDPOINT_URL": moto.url}
        yield SharedStores(backend, url, f"s3://{bucket}/batchgate", env, postgres_scalar(pg, url))


BACKENDS = ["sqlite", "postgres+s3"]


@pytest.fixture(params=BACKENDS)
async def stores(request, tmp_path: Path) -> AsyncIterator[SharedStores]:
    """The shared stores, once per backend (import this fixture into a test module to use it)."""
    async with shared_stores(request.param, tmp_path / "shared", request) as s:
        yield s


class Caller:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.files = file_pb2_grpc.FileServiceStub(channel)
        self.batches = batch_pb2_grpc.BatchServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {MASTER_KEY}"),)
        self.project = "default"


@dataclasses.dataclass
class Replica:
    index: int
    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None
    channel: grpc.aio.Channel | None = None
    caller: Caller | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    def __init__(self, root: Path, stores: SharedStores, config: Path, *, lease_timeout: float = 2.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.stores = stores
        self.config = config
        self.lease_timeout = lease_timeout
        self.extra_args = extra_args
        self.replicas: list[Replica] = []
        self._old_channels: list[grpc.aio.Channel] = []

    def _spawn(self, replica: Replica) -> None:
        env = dict(os.environ, BATCHGATE_MASTER_KEY=MASTER_KEY, **self.stores.env)
        log = open(replica.data_dir.with_suffix(".log"), "ab")
        urls = ["--database-url", self.stores.database_url, "--blob-url", self.stores.blob_url]
        replica.proc = subprocess.Popen(
            [SERVER, "--address", f"127.0.0.1:{replica.port}", "--data-dir", str(replica.data_dir),
             "--config", str(self.config), "--log-level", "WARNING", *(urls if self.stores.database_url else ()),
             "--lease-timeout", str(self.lease_timeout), *self.extra_args],
            env=env, stdout=log, stderr=log)
        log.close()

    async def _connect(self, replica: Replica) -> None:
        replica.channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
        ready = asyncio.ensure_future(replica.channel.channel_ready())
        deadline = time.monotonic() + 60
        while not ready.done():
            if not replica.alive or time.monotonic() > deadline:
                ready.cancel()
                raise AssertionError(f"replica {replica.index} did not start: {self.log_of(replica)[-2000:]}")
            await asyncio.wait({ready}, timeout=0.1)
        replica.caller = Caller(replica.channel)

    def log_of(self, replica: Replica) -> str:
        path = replica.data_dir.with_suffix(".log")
        return path.read_text(errors="replace") if path.exists() else ""

    async def start(self, n: int) -> list[Replica]:
        """Start `n` replicas at once (their start-ups race, migrations included)."""
        new = [Replica(len(self.replicas) + i, free_port(), self.root / f"replica-{len(self.replicas) + i}")
               for i in range(n)]
        for replica in new:
            self._spawn(replica)
        self.replicas += new
        await asyncio.gather(*(self._connect(r) for r in new))
        return new

    async def restart(self, replica: Replica) -> None:
        """Start `replica` again on its data directory."""
        self._old_channels.append(replica.channel)
        self._spawn(replica)
        await self._connect(replica)

    async def kill(self, replica: Replica) -> None:
        """kill -9: no shutdown, no lease released."""
        os.kill(replica.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(replica.proc.wait)
        # The channel stays open: calls on it fail UNAVAILABLE, as a client would see them.

    async def close(self) -> None:
        for replica in self.replicas:
            if replica.alive:
                replica.proc.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.proc is not None:
                try:
                    await asyncio.to_thread(replica.proc.wait, 30)
                except subprocess.TimeoutExpired:
                    replica.proc.kill()
            if replica.channel is not None:
                await replica.channel.close()
        for channel in self._old_channels:
            await channel.close()

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]
