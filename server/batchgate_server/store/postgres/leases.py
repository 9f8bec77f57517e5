"""Replica leases, answer segments and change notifications on PostgreSQL (core/ownership.py and
the SQLite store's methods of the same names describe the semantics).

Adoption is one statement: the candidates are chosen `FOR UPDATE OF b SKIP LOCKED`, so replicas
adopting at once each take different batches without waiting for each other; a batch another
replica adopted meanwhile is re-checked against its new owner's live lease and left alone.

Every committed revision is announced by a trigger (migration 2) with NOTIFY on CHANNEL, payload
"<batch id> <revision>", which PostgresChangeFeed (changes.py) hears on a connection of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from batchgate_server.domain.models import BatchRecord
from batchgate_server.store.codec import batch_from_doc
from batchgate_server.store.errors import LeaseLost, RevisionConflict
from batchgate_server.store.postgres.migrations import TERMINAL

CHANNEL = "batchgate_batches"


class PostgresLeases:
    """Mixed into PostgresMetadataStore (uses its _execute, _fetch and _transaction)."""

    async def _refused(self, batch_id: str, owner: str | None) -> None:
        """An update matched no row: LeaseLost when another replica owns the batch now,
        RevisionConflict otherwise."""
        if owner is not None:
            row = await self._fetchrow("SELECT owner FROM batches WHERE id = $1", batch_id)
            if row is not None and row["owner"] != owner:
                raise LeaseLost(batch_id)
        raise RevisionConflict(batch_id)

    async def renew_lease(self, replica: str, now: float, expires: float) -> None:
        await self._execute(
            "INSERT INTO replicas(id, started_at, lease_expires) VALUES ($1, $2, $3)"
            " ON CONFLICT (id) DO UPDATE SET lease_expires = excluded.lease_expires", replica, now, expires)

    async def owned_batches(self, replica: str) -> dict[str, int]:
        rows = await self._fetch(f"SELECT id, revision FROM batches WHERE owner = $1 AND status NOT IN {TERMINAL}",
                                 replica)
        return {r["id"]: r["revision"] for r in rows}

    async def adopt_batches(self, replica: str, now: float, limit: int, *, own: bool = False) -> list[BatchRecord]:
        # Adoptable: unowned, or owned by a replica with no live lease (or by us, with `own`). Said
        # with NOT EXISTS, not a LEFT JOIN, and checked again by the UPDATE itself: when another
        # replica adopts the row first, READ COMMITTED re-evaluates the locked row's new version, and
        # a LEFT JOIN would then null-extend (no lease row for the old owner matches) and pass.
        def adoptable(row: str) -> str:
            return (f"({row}.owner IS NULL OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = {row}.owner"
                    f" AND r.lease_expires >= $1)" + (f" OR {row}.owner = $2)" if own else ")"))

        rows = await self._fetch(
            f"WITH chosen AS (SELECT b.id FROM batches b WHERE b.status NOT IN {TERMINAL} AND {adoptable('b')}"
            f" ORDER BY b.created_at LIMIT $3 FOR UPDATE OF b SKIP LOCKED)"
            f" UPDATE batches SET owner = $2 FROM chosen WHERE batches.id = chosen.id AND {adoptable('batches')}"
            f" RETURNING batches.doc, batches.created_at", now, replica, limit)
        return [batch_from_doc(r["doc"]) for r in sorted(rows, key=lambda r: r["created_at"])]

    async def release_batches(self, replica: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("UPDATE batches SET owner = NULL WHERE owner = $1", replica)
            await conn.execute("DELETE FROM replicas WHERE id = $1", replica)

    async def batch_revisions(self, batch_ids: Sequence[str]) -> dict[str, int]:
        if not batch_ids:
            return {}
        rows = await self._fetch("SELECT id, revision FROM batches WHERE id = ANY($1::text[])", list(batch_ids))
        return {r["id"]: r["revision"] for r in rows}

    async def append_results(self, batch_id: str, seq: int, writer: str, output: bytes, errors: bytes, *,
                             owner: str) -> None:
        status = await self._execute(
            "INSERT INTO executor_results(batch_id, seq, writer, output, errors)"
            " SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM batches WHERE id = $1 AND owner = $6)",
            batch_id, seq, writer, output, errors, owner)
        if status != "INSERT 0 1":
            raise LeaseLost(batch_id)

    async def read_results(self, batch_id: str) -> list[tuple[str, bytes, bytes]]:
        rows = await self._fetch(
            "SELECT writer, output, errors FROM executor_results WHERE batch_id = $1 ORDER BY seq", batch_id)
        return [(r["writer"], bytes(r["output"]), bytes(r["errors"])) for r in rows]

    async def delete_results(self, batch_id: str) -> None:
        await self._execute("DELETE FROM executor_results WHERE batch_id = $1", batch_id)
