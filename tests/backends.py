"""Which stores the in-process test servers use, chosen by BATCHGATE_TEST_BACKEND:

    sqlite        (the default) SQLite and local disk in each test server's data directory
    postgres+s3   one PostgreSQL server and one moto S3 server for the whole run, started on first use
                  and stopped at exit; each data directory gets a database and a bucket of its own, so
                  a server restarted on the same data directory finds its state again

`make test` runs the integration suite once per backend. A test about the local stores themselves
(files in the data directory, a tmpfs under it, SQLite internals) is marked `local_stores` and runs
with the default backend only.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

BACKENDS = ("sqlite", "postgres+s3")
BACKEND = os.environ.get("BATCHGATE_TEST_BACKEND", "sqlite")
if BACKEND not in BACKENDS:
    raise RuntimeError(f"BATCHGATE_TEST_BACKEND={BACKEND!r}: use one of {', '.join(BACKENDS)}")

_servers: dict[str, object] = {}
_stores_by_data_dir: dict[Path, dict[str, str]] = {}


def _shared(name: str, start):
    if name not in _servers:
        server = start()
        atexit.register(server.stop)
        _servers[name] = server
    return _servers[name]


def store_overrides(data_dir: Path) -> dict[str, str]:
    """Settings overrides (database_url, blob_url) for a test server on `data_dir`: none for the
    default backend; the same database and bucket every time for one data directory."""
    if BACKEND == "sqlite":
        return {}
    key = Path(data_dir).resolve()
    if key not in _stores_by_data_dir:
        from tests.backends_objects import MotoS3Process, new_bucket_name
        from tests.backends_pg import PostgresServer

        postgres = _shared("postgres", PostgresServer.start)
        moto = _shared("moto", lambda: _started(MotoS3Process()))
        # What the S3 blob store reads (moto takes any credentials).
        os.environ.update(BATCHGATE_S3_ENDPOINT_URL=moto.url, AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        bucket = new_bucket_name()
        moto.client().create_bucket(Bucket=bucket)
        _stores_by_data_dir[key] = {"database_url": postgres.create_database(), "blob_url": f"s3://{bucket}/blobs"}
    return dict(_stores_by_data_dir[key])


def _started(process):
    process.start()
    return process


def stored_blobs(data_dir: Path) -> list[str]:
    """Every file the blob store of the test server on `data_dir` holds, wherever its backend keeps
    them: blobs and temporary files on local disk, objects (staging ones included) in S3."""
    if BACKEND == "sqlite":
        return sorted(str(p) for p in (Path(data_dir) / "files").rglob("*") if p.is_file())
    bucket, prefix = _bucket_of(data_dir)
    listed = _servers["moto"].client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def uploads_in_flight(data_dir: Path) -> list[str]:
    """What unfinished uploads leave in the backend: temporary files on local disk; staging objects and
    multipart uploads in S3."""
    if BACKEND == "sqlite":
        return sorted(p.name for p in (Path(data_dir) / "files" / "tmp").iterdir())
    bucket, prefix = _bucket_of(data_dir)
    client = _servers["moto"].client()
    staged = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/.staging/").get("Contents", [])
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
    return sorted([o["Key"] for o in staged] + [u["Key"] for u in pending])


def _bucket_of(data_dir: Path) -> tuple[str, str]:
    bucket, _, prefix = store_overrides(data_dir)["blob_url"].removeprefix("s3://").partition("/")
    return bucket, prefix
