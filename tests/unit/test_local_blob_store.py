"""The local blob store's own housekeeping: temporary files left by a crash are cleared at start."""

from __future__ import annotations

import os
import time

from batchgate_server.store.blobs.local import STALE_TEMPORARY
from batchgate_server.store.urls import blob_url, open_blob_store, parse_url


async def _leave_temporaries(store) -> None:
    (store.tmp_dir / "fresh.part").write_bytes(b"a writer of another server, still running")
    old = store.tmp_dir / "old.part"
    old.write_bytes(b"left by a crash")
    then = time.time() - STALE_TEMPORARY - 60
    os.utime(old, (then, then))


async def test_in_the_locked_data_dir_every_temporary_is_cleared(tmp_path):
    data = tmp_path / "data"
    store = await open_blob_store(blob_url("", data), data)
    await _leave_temporaries(store)
    store = await open_blob_store(blob_url("", data), data)
    assert list(store.tmp_dir.iterdir()) == []


async def test_in_a_directory_other_servers_may_share_only_stale_temporaries_are_cleared(tmp_path):
    data, shared = tmp_path / "data", tmp_path / "shared"
    url = parse_url("--blob-url", shared.as_uri())
    store = await open_blob_store(url, data)
    await _leave_temporaries(store)
    store = await open_blob_store(url, data)
    assert [p.name for p in store.tmp_dir.iterdir()] == ["fresh.part"]
