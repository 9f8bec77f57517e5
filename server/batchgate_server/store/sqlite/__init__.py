"""The SQLite metadata store and usage ledger (the default: one file in the data directory)."""

from __future__ import annotations

from pathlib import Path

from batchgate_server.store.sqlite.ledger import SqliteUsageLedger
from batchgate_server.store.sqlite.metadata import SqliteMetadataStore
from batchgate_server.store.urls import Database, StoreUrl


async def open_database(url: StoreUrl, data_dir: Path) -> Database:
    """`sqlite:///abs/path.sqlite3` (store/urls.py)."""
    store = await SqliteMetadataStore.open(url.local_path())
    return Database(store, SqliteUsageLedger(store))
