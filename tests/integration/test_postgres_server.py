"""The server on `--database-url postgresql://…`: keys, files, a batch run to its end and its usage,
all in PostgreSQL, read back by another server on the same database; a database outage is
UNAVAILABLE (retried by clients) and an unreachable one a clear start-up error."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest

from batchgate.v1 import batch_pb2, file_pb2, usage_pb2
from batchgate_server.core.errors import STORAGE_UNAVAILABLE_RETRY_AFTER
from tests.conftest import MASTER_KEY, Caller, batch_file, serving
from tests.integration.batch_helpers import create, results, watch_all
from tests.integration.test_storage_unavailable import assert_storage_unavailable
from tests.integration.usage_helpers import query

SERVER = str(Path(sys.executable).with_name("batchgate-server"))


async def test_a_batch_runs_on_postgresql_and_another_server_reads_it_all_back(tmp_path, postgres_url):
    blobs = (tmp_path / "blobs").as_uri()
    out = subprocess.run([SERVER, "keys", "create", "--project", "carol", "--data-dir", str(tmp_path / "keys"),
                          "--database-url", postgres_url], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    secret = re.search(r"api_key: (\S+)", out).group(1)
    async with serving(tmp_path / "one", database_url=postgres_url, blob_url=blobs) as h:
        carol = Caller(h.alice.files, h.alice.batches, (("authorization", f"Bearer {secret}"),), "carol")
        f = await h.upload(carol, batch_file(3, model="simulated"), request_id="upload-\x00-1")
        batch = await create(carol, f.id, metadata={"team": "search"}, request_id="create-1")
        final = (await watch_all(carol, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 3
        out_lines, _ = await results(carol, final)
        usage = await query(h, carol, group_by=[usage_pb2.USAGE_GROUP_BY_METADATA_KEY], metadata_key="team")
        listed = await carol.files.ListFiles(file_pb2.ListFilesRequest(page_size=1), metadata=carol.metadata)
        assert listed.next_page_token
    assert not list((tmp_path / "one").glob("*.sqlite3*")), "no SQLite beside PostgreSQL"

    async with serving(tmp_path / "two", database_url=postgres_url, blob_url=blobs) as h:  # another replica
        carol = Caller(h.alice.files, h.alice.batches, (("authorization", f"Bearer {secret}"),), "carol")
        again = (await carol.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id),
                                              metadata=carol.metadata)).batch
        assert again.revision == final.revision and again.status == final.status
        assert (await results(carol, again))[0] == out_lines
        assert await query(h, carol, group_by=[usage_pb2.USAGE_GROUP_BY_METADATA_KEY],
                           metadata_key="team") == usage
        assert [row.group["metadata.team"] for row in usage.rows] == ["search"]
        assert usage.totals.batch_count == 1
        # The page-token key is shared: a token one server gave is good on the other.
        rest = await carol.files.ListFiles(file_pb2.ListFilesRequest(page_size=10, page_token=listed.next_page_token),
                                           metadata=carol.metadata)
        assert len(rest.files) == 1  # the input file, then its output file
        # Request ids keep their U+0000: the same upload again is the same file.
        assert (await h.upload(carol, batch_file(3, model="simulated"), request_id="upload-\x00-1")).id == f.id
        admin = Caller(h.alice.files, h.alice.batches, (("authorization", f"Bearer {MASTER_KEY}"),), "default")
        assert batch.id in [b.id for b in (await admin.batches.ListBatches(
            batch_pb2.ListBatchesRequest(), metadata=admin.metadata)).batches]


async def test_a_database_outage_is_unavailable_with_retry_info_then_calls_work_again(tmp_path, postgres_server):
    """No connection to be had (every one cut, none allowed): calls are UNAVAILABLE with reason
    STORAGE_UNAVAILABLE and RetryInfo, which clients retry, not UNKNOWN; then the server recovers."""
    url = postgres_server.create_database(owner="app")
    try:
        async with serving(tmp_path / "data", database_url=url, http_address="127.0.0.1:0") as h, \
                aiohttp.ClientSession() as http:
            a = h.alice
            f = await h.upload(a, batch_file(1, model="simulated"))
            postgres_server.set_connection_limit(url, 0)
            assert postgres_server.terminate_connections(url) >= 1
            async with http.get(f"http://127.0.0.1:{h.server.http_port}/v1/files/{f.id}",
                                headers=dict(a.metadata)) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == str(math.ceil(STORAGE_UNAVAILABLE_RETRY_AFTER))
                assert (await response.json())["error"]["code"] == "storage_unavailable"
            for call in (a.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=a.metadata),
                         a.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=a.metadata)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert_storage_unavailable(caught.value)
            postgres_server.set_connection_limit(url, -1)
            got = await a.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=a.metadata)
            assert got.file.id == f.id
    finally:
        postgres_server.drop_database(url)


def test_an_unreachable_database_stops_the_start_with_a_clear_error(tmp_path):
    result = subprocess.run([SERVER, "--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
                             "--database-url", "postgresql://batchgate:s3cr3t@127.0.0.1:1/batchgate"],
                            env={**os.environ, "BATCHGATE_MASTER_KEY": "k"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stderr
    assert "batchgate-server: storage error: the database connection failed" in result.stderr
    assert "Traceback" not in result.stderr and "s3cr3t" not in result.stderr
