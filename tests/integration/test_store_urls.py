"""--database-url and --blob-url: where the server keeps its metadata and its file bytes, and the
clear start-up error for a URL this build cannot open."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchgate.v1 import file_pb2
from batchgate_server.store.urls import StoreUrlError, blob_url, database_url, parse_url
from tests.conftest import batch_file, start_harness

SERVER = str(Path(sys.executable).with_name("batchgate-server"))


def _start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A server start that must fail before it listens."""
    return subprocess.run([SERVER, "--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), *args],
                          env={**os.environ, "BATCHGATE_MASTER_KEY": "k", **(env or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("args", "says"), [
    (["--database-url", "mysql://u@h/db"], "--database-url mysql://u@h/db: no metadata store for the scheme 'mysql'"
                                           " in this build (available: postgresql://, sqlite://"),
    (["--blob-url", "ftp://host/dir"], "--blob-url ftp://host/dir: no blob store for the scheme 'ftp'"),
    (["--database-url", "sqlite://relative/path.sqlite3"], "a sqlite URL names a local path, not a host"),
    (["--database-url", "sqlite:///"], "the path must be absolute"),
    (["--blob-url", "file:///tmp/x?versioned=1"], "takes no query or fragment"),
    (["--database-url", "no-scheme-at-all"], "not a URL"),
    (["--blob-url", "s3://bucket:notaport/x"], "not a URL"),
])
def test_a_url_this_build_cannot_open_stops_the_start_with_exit_code_2(tmp_path, args, says):
    result = _start(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_the_environment_sets_the_urls_and_an_error_never_shows_the_password(tmp_path):
    result = _start(tmp_path, env={"BATCHGATE_DATABASE_URL": "mysql://admin:s3cr3t@db.example:3306/batchgate"})
    assert result.returncode == 2, result.stderr
    assert "mysql://admin:***@db.example:3306/batchgate" in result.stderr
    assert "s3cr3t" not in result.stderr
    result = _start(tmp_path, env={"BATCHGATE_BLOB_URL": "nfs://filer/x"})
    assert result.returncode == 2 and "no blob store for the scheme 'nfs'" in result.stderr


def test_keys_create_refuses_an_unknown_database_url_too(tmp_path):
    result = subprocess.run([SERVER, "keys", "create", "--project", "p", "--data-dir", str(tmp_path / "data"),
                             "--database-url", "mysql://h/db"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no metadata store for the scheme 'mysql'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_database_and_the_blobs_live_where_the_urls_say(tmp_path):
    db_file, blob_root = tmp_path / "meta" / "my db.sqlite3", tmp_path / "bytes"
    db_file.parent.mkdir()
    # keys create writes to the database the URL names.
    out = subprocess.run([SERVER, "keys", "create", "--project", "p", "--data-dir", str(tmp_path / "data"),
                          "--database-url", db_file.as_uri().replace("file:", "sqlite:", 1)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    secret = re.search(r"api_key: (\S+)", out).group(1)
    h = await start_harness(tmp_path / "data", database_url=db_file.as_uri().replace("file:", "sqlite:", 1),
                            blob_url=blob_root.as_uri())
    try:
        assert await h.server.auth.authenticate((("authorization", f"Bearer {secret}"),))
        content = batch_file(3)
        f = await h.upload(h.alice, content)
        download = h.alice.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=f.id), metadata=h.alice.metadata)
        assert b"".join([r.data async for r in download]) == content
        assert [p.name for p in blob_root.rglob(f.id)] == [f.id]
        assert db_file.exists()
        assert not (tmp_path / "data" / "batchgate.sqlite3").exists()
        assert not (tmp_path / "data" / "files").exists()
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


def test_unset_urls_mean_sqlite_and_local_disk_in_the_data_dir(tmp_path):
    data = tmp_path / "my data"
    assert database_url("", data).local_path() == (data / "batchgate.sqlite3").resolve()
    assert blob_url("", data).local_path() == (data / "files").resolve()
    assert database_url("", data).scheme == "sqlite" and blob_url("", data).scheme == "file"


def test_a_parsed_url_keeps_everything_but_shows_no_password():
    url = parse_url("--database-url", "PostgreSQL://user:p%40ss@host:5433/db?sslmode=require")
    assert url.scheme == "postgresql"
    assert (url.parts.username, url.parts.password, url.parts.port) == ("user", "p%40ss", 5433)
    assert str(url) == url.redacted == "postgresql://user:***@host:5433/db?sslmode=require"
    assert parse_url("--blob-url", "s3://bucket/prefix").redacted == "s3://bucket/prefix"
    with pytest.raises(StoreUrlError):
        parse_url("--blob-url", "")
