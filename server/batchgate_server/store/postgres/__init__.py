"""The PostgreSQL implementation of the metadata store and usage ledger (`--database-url
postgresql://…`): metadata.py, ledger.py, the schema in migrations.py, driver errors mapped to the
neutral ones in errors.py."""

from __future__ import annotations

from pathlib import Path

from batchgate_server.store.postgres.ledger import PostgresUsageLedger
from batchgate_server.store.postgres.metadata import PostgresMetadataStore
from batchgate_server.store.urls import Database, StoreUrl


async def open_database(url: StoreUrl, data_dir: Path) -> Database:
    """`postgresql://user:password@host:port/database` (store/urls.py); the data directory is not used."""
    store = await PostgresMetadataStore.open(url.parts.geturl())
    return Database(store, PostgresUsageLedger(store))


__all__ = ["PostgresMetadataStore", "PostgresUsageLedger", "open_database"]
