"""A real PostgreSQL for the tests (and benches): the Debian server binaries started in a temporary
directory on a free loopback port, once per test session, with a fresh database for every test
that asks for one.

    postgres_server   the session's server (PostgresServer), started on first use, stopped at the end
    postgres_url      a new empty database on it for one test: postgresql://postgres@127.0.0.1:PORT/test_N

As root (CI too) the server runs as the `postgres` user (PostgreSQL refuses to run as root), in a
directory that user owns. `.ci/run` installs the `postgresql` package when no initdb is found.
The server trades durability for speed (fsync off): a test never outlives its server.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "postgres"


def find_bin_dir() -> Path | None:
    """The newest installed server's bin directory (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One throwaway PostgreSQL server. `start()` runs initdb and pg_ctl; `stop()` removes it all."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.port = port
        self._names = itertools.count(1)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _as_owner(self, *argv: str) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run the command as the postgres user."""
        return ["runuser", "-u", SUPERUSER, "--", *argv] if os.geteuid() == 0 else list(argv)

    def _run(self, *argv: str) -> str:
        done = subprocess.run(self._as_owner(*argv), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    @classmethod
    def start(cls, **settings: str) -> "PostgresServer":
        """initdb in a new temporary directory and start the server on a free loopback port.
        `settings` are extra server parameters (name=value)."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                               "(apt-get install -y postgresql; .ci/run does this)")
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
        root = Path(tempfile.mkdtemp(prefix="batchgate-pg-"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(root, owner.pw_uid, owner.pw_gid)
        server = cls(bin_dir, root, _free_port())
        try:
            server._run(str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SUPERUSER, "--auth=trust",
                        "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
            server._pg_ctl_start(settings)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    def _pg_ctl_start(self, settings: dict[str, str]) -> None:
        params = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.root), "fsync": "off",
                  "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300", **settings}
        for attempt in range(3):  # the free port may be taken by someone else before the server binds it
            options = " ".join(f"-c {name}={value}" for name, value in {**params, "port": str(self.port)}.items())
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data_dir),
                          "-l", str(self.root / "server.log"), "-o", options)
                return
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}") from None
                self.port = _free_port()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` as the superuser; the rows, unaligned and without headers."""
        return self._run(str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql)

    def create_database(self, tablespace: str = "", owner: str = "") -> str:
        """A new empty database; its URL. FILE_COPY: with fsync off, copying the template's files is
        faster than writing them all to the WAL (the default strategy). `owner`: an ordinary role
        (made if need be) owns it, and the URL connects as that role (not a superuser, which
        PostgreSQL exempts from connection limits)."""
        name = f"test_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} STRATEGY FILE_COPY" + (f" TABLESPACE {tablespace}" if tablespace else ""))
        if not owner:
            return self.url(name)
        self.psql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}')"
                  f" THEN CREATE ROLE {owner} LOGIN; END IF; END $$")
        self.psql(f"ALTER DATABASE {name} OWNER TO {owner}")
        return self.url(name).replace(f"//{SUPERUSER}@", f"//{owner}@")

    def set_connection_limit(self, url: str, limit: int) -> None:
        """At most `limit` connections to the database of `url` (-1: no limit) for ordinary roles."""
        self.psql(f"ALTER DATABASE {url.rsplit('/', 1)[1]} CONNECTION LIMIT {limit}")

    def drop_database(self, url: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def terminate_connections(self, url: str) -> int:
        """pg_terminate_backend on every connection to the database of `url`; how many there were."""
        name = url.rsplit("/", 1)[1]
        out = self.psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{name}'")
        return int(out.strip())

    def chown_to_server(self, path: Path) -> None:
        """Let the server write in `path` (a tablespace directory)."""
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run(str(self.bin_dir / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(self.data_dir))
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)


class StoreOpener:
    """Opens PostgreSQL metadata stores on one database, each another server on it (its own pool),
    and closes them all at the end of the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list = []

    async def __call__(self):
        from batchgate_server.store.postgres import PostgresMetadataStore

        store = await PostgresMetadataStore.open(self.url)
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture
async def open_postgres_store(postgres_url: str):
    opener = StoreOpener(postgres_url)
    try:
        yield opener
    finally:
        await opener.close()


async def run_sql(store, sql: str, *args) -> list[dict]:
    """Test-only: run `sql` (with `?` placeholders) on the database of `store`, SQLite or PostgreSQL,
    committed; its rows as dicts. For what no store method does (revoking a key, reading raw rows)."""
    from batchgate_server.store.postgres import PostgresMetadataStore

    if isinstance(store, PostgresMetadataStore):
        numbered = iter(range(1, len(args) + 1))
        async with store.pool.acquire() as conn:
            rows = await conn.fetch(re.sub(r"\?", lambda _: f"${next(numbered)}", sql), *args)
        return [dict(r) for r in rows]
    if sql.lstrip().upper().startswith("SELECT"):
        return [dict(r) for r in await store.readers.fetchall(sql, args)]
    await store.db.execute(sql, args)
    return []
