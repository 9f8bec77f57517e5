"""The PostgreSQL implementation of the metadata store and usage ledger (`--database-url
postgresql://…`): metadata.py, ledger.py, the schema in migrations.py, driver errors mapped to the
neutral ones in errors.py."""

from __future__ import annotations

from batchgate_server.store.postgres.ledger import PostgresUsageLedger
from batchgate_server.store.postgres.metadata import PostgresMetadataStore

SCHEMES = ("postgresql", "postgres")


async def open_postgres_store(url: str) -> PostgresMetadataStore:
    """The store on the database of `url` (postgresql://user:password@host:port/database), migrated."""
    return await PostgresMetadataStore.open(url)


__all__ = ["SCHEMES", "PostgresMetadataStore", "PostgresUsageLedger", "open_postgres_store"]
