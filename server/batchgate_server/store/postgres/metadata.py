"""Metadata store on PostgreSQL through asyncpg: the same methods and semantics as the SQLite
store, for any number of servers on one database.

The driver, by measurement (bench/postgres_driver.py: 64 concurrent callers, a pool of 10; four
runs on the 2-core machine shared with other work, load 3 to 8): on point reads (GetBatch, the hot
path) asyncpg spent 0.62-0.85x the client CPU of psycopg 3 (async) in every run (109-167 against
161-206 us, JSON decoding included) and served 1.18-1.48x its rate in three runs of four (0.84x
in the busiest). On update transactions they were even: 0.73-1.00x the CPU, 0.94-1.20x the rate.
psycopg's p99 was the lower in every run (31-40 against 38-80 ms for reads). The server's CPU is
what the executor and every RPC share, so the CPU per read decides. asyncpg also speaks the binary
protocol natively on asyncio (no libpq), prepares and caches statements by itself, has its own
pool, and gives every server error its SQLSTATE (store/postgres/errors.py maps them).

Batches keep their queryable fields as columns and the whole record as a JSON document; every
change bumps `revision` with a compare-and-set on the old one (RevisionConflict), so two servers
writing one batch cannot both win: the second's UPDATE waits for the first's row lock, then finds
the revision moved on and changes nothing.

Read-your-writes: a write returns after its commit, and every statement at PostgreSQL's default
READ COMMITTED isolation reads a snapshot taken when it starts, so any read issued after a write
returned — on any pooled connection, from any server on the database — sees it, and never sees
a transaction that may still roll back.

A write whose connection is lost while it commits may or may not have committed (the client
cannot tell): it raises StorageUnavailable either way, and the writer's next compare-and-set
tells which (RevisionConflict when it had).

Connections: `pool` serves every statement here (at most POOL_SIZE at once per server). Work that
needs a connection of its own for long (LISTEN) opens one with `connect()`, outside the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from batchgate_server.domain.models import ApiKeyRecord, BatchRecord, BatchStatus, FileRecord, ProjectQuota
from batchgate_server.domain.webhooks import OutboxEvent, WebhookEndpoint
from batchgate_server.store.codec import batch_from_doc, batch_to_doc, file_from_row, groups_to_json
from batchgate_server.store.errors import QuotaReached, RevisionConflict, StorageUnavailable
from batchgate_server.store.ports import MetadataStore
from batchgate_server.store.postgres import locks, migrations
from batchgate_server.store.postgres.changes import PostgresChangeFeed
from batchgate_server.store.postgres.leases import PostgresLeases
from batchgate_server.store.postgres.errors import is_connection_lost, pg_errors

POOL_SIZE = 10
CLOSE_TIMEOUT = 5.0
_LEDGER_COLUMNS = frozenset({
    "batch_id", "project", "api_key_id", "model", "provider", "deployment_id", "created_at", "ended_at",
    "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost_status", "cost_amount",
    "cost_nanos", "metadata", "usage_by_model", "parent_batch_id", "cache_creation_tokens",
    "cache_creation_1h_tokens"})


def text_param(value: str) -> str | None:
    """`value` as a text parameter for a lookup. PostgreSQL's text cannot hold U+0000, and nothing
    stored as text has one, so such a value matches nothing: NULL (equal to nothing) says so
    without an error."""
    return None if "\x00" in value else value


def utf8(value: str) -> bytes:
    """A string stored as bytea (it may hold U+0000): UTF-8, whose byte order is SQLite's text order."""
    return value.encode("utf-8", "surrogatepass")


class Params:
    """Positional parameters of one statement: `p(value)` appends it and returns "$n"."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _keyset_query(select: str, project: str | None, conditions: Sequence[str], p: Params,
                  after: tuple[float, str] | None, limit: int, oldest_first: bool = False,
                  id_column: str = "id") -> str:
    """`select` filtered by project (None: all) and `conditions` (SQL with p's parameters), newest
    first (or oldest first), from after the keyset cursor (created_at, id), at most `limit` rows.
    Either way an index on (…, created_at DESC, id DESC) serves it, read forwards or backwards."""
    where = ["TRUE", *conditions]
    if project is not None:
        where.append(f"project = {p(text_param(project))}")
    if after:
        beyond = ">" if oldest_first else "<"
        where.append(f"(created_at, {id_column}) {beyond} ({p(after[0])}, {p(text_param(after[1]))})")
    direction = "ASC" if oldest_first else "DESC"
    return (f"{select} WHERE {' AND '.join(where)} ORDER BY created_at {direction}, {id_column} {direction}"
            f" LIMIT {p(limit)}")


_API_KEY_SELECT = ("SELECT key_id AS id, project, created_at, name, expires_at, revoked_at, last_used_at"
                   " FROM api_keys")


def _file(row: asyncpg.Record) -> FileRecord:
    fields = dict(row)
    fields["model"] = bytes(fields["model"]).decode("utf-8", "surrogatepass")
    request_id = fields["request_id"]
    fields["request_id"] = bytes(request_id).decode("utf-8", "surrogatepass") if request_id is not None else ""
    return file_from_row(fields)


_FILE_COLUMNS = "id, project, filename, purpose, bytes, sha256, created_at, expires_at, line_count, endpoint," \
                " model, request_id, line_groups, merged_into"
_INSERT_FILE = (f"INSERT INTO files({_FILE_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)")
# A project's stored bytes, as its quota counts them: shards' result files are the service's own.
_STORED_BYTES = "SELECT coalesce(sum(bytes), 0) FROM files WHERE project = $1 AND merged_into IS NULL"


def _file_args(f: FileRecord) -> tuple:
    return (f.id, f.project, f.filename, f.purpose.value, f.bytes, f.sha256, f.created_at, f.expires_at,
            f.line_count, f.endpoint, utf8(f.model), utf8(f.request_id) if f.request_id else None,
            groups_to_json(f.groups), f.merged_into or None)


class PostgresMetadataStore(PostgresLeases, MetadataStore):
    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self.url = url
        self.pool = pool
        self.changes = PostgresChangeFeed(self.connect)

    @classmethod
    async def open(cls, url: str, pool_size: int = POOL_SIZE) -> "PostgresMetadataStore":
        """Connect to `url` (postgresql://user:password@host:port/database?sslmode=…) and migrate
        the schema (one server at a time; see migrations.py). StorageUnavailable when the database
        cannot be reached."""
        with pg_errors():
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size,
                                             server_settings={"application_name": "batchgate"})
        store = cls(url, pool)
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool (for LISTEN); the caller closes it."""
        with pg_errors():
            return await asyncpg.connect(self.url, server_settings={"application_name": "batchgate"})

    async def close(self) -> None:
        """Close the pool, waiting up to CLOSE_TIMEOUT seconds for statements still running, then
        cutting them off (a database gone away has nothing left to wait for)."""
        await self.changes.close()
        try:
            await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            self.pool.terminate()

    async def migrate(self) -> None:
        with pg_errors():
            async with self.pool.acquire() as conn:
                await migrations.migrate(conn)

    async def schema_version(self) -> int:
        with pg_errors():
            async with self.pool.acquire() as conn:
                return await migrations.schema_version(conn)

    # -- statements ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _statements(self) -> AsyncIterator[None]:
        """Driver errors leave as StorageErrors. A lost connection means the others in the pool
        may be dead too (a database restart or failover kills them all): every pooled connection
        is replaced before its next use."""
        try:
            with pg_errors():
                yield
        except StorageUnavailable as err:
            if is_connection_lost(err.__cause__ or err):
                await self.pool.expire_connections()
            raise

    async def _read(self, method: str, sql: str, *args: Any) -> Any:
        """pool.fetch / fetchrow. A read whose connection was lost is tried once more, on a new
        connection: reads change nothing, so a retry is always safe."""
        for attempt in (1, 2):
            try:
                async with self._statements():
                    return await getattr(self.pool, method)(sql, *args)
            except StorageUnavailable as err:
                if attempt == 2 or not is_connection_lost(err.__cause__ or err):
                    raise

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._read("fetch", sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._read("fetchrow", sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        """One statement in its own transaction; its status ("UPDATE 1")."""
        async with self._statements():
            return await self.pool.execute(sql, *args)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection in a transaction, committed when the block ends, rolled back on an error."""
        async with self._statements(), self.pool.acquire() as conn, conn.transaction():
            yield conn

    # -- server secrets -------------------------------------------------------------------

    async def server_secret(self, name: str) -> bytes:
        """The secret `name` (32 random bytes): the first server to ask creates it, every later
        start and every other server on this database reads the same one."""
        await self._execute("INSERT INTO server_secrets(name, value, created_at) VALUES ($1, $2, $3)"
                            " ON CONFLICT (name) DO NOTHING", name, secrets.token_bytes(32), time.time())
        # A statement of its own: its snapshot includes the row whoever inserted it.
        row = await self._fetchrow("SELECT value FROM server_secrets WHERE name = $1", name)
        return bytes(row["value"])

    # -- api keys -------------------------------------------------------------------------

    async def add_api_key(self, key_hash: str, key: ApiKeyRecord) -> None:
        await self._execute("INSERT INTO api_keys(key_hash, key_id, project, created_at, name, expires_at)"
                            " VALUES ($1, $2, $3, $4, $5, $6)",
                            key_hash, key.id, key.project, key.created_at, key.name, key.expires_at)

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self._fetchrow(f"{_API_KEY_SELECT} WHERE key_hash = $1", text_param(key_hash))
        return ApiKeyRecord(**row) if row else None

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._fetchrow(f"{_API_KEY_SELECT} WHERE key_id = $1", text_param(key_id))
        return ApiKeyRecord(**row) if row else None

    async def list_api_keys(self, project: str | None, limit: int,
                            after: tuple[float, str] | None) -> list[ApiKeyRecord]:
        p = Params()
        sql = _keyset_query(_API_KEY_SELECT, project, [], p, after, limit, id_column="key_id")
        return [ApiKeyRecord(**r) for r in await self._fetch(sql, *p.values)]

    async def revoke_api_key(self, key_id: str, now: float) -> ApiKeyRecord | None:
        await self._execute("UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
                            now, text_param(key_id))
        return await self.get_api_key(key_id)

    async def touch_api_key(self, key_id: str, now: float) -> None:
        await self._execute("UPDATE api_keys SET last_used_at = $1 WHERE key_id = $2", now, text_param(key_id))

    async def count_api_keys(self) -> int:
        row = await self._fetchrow("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0])

    # -- project quotas -------------------------------------------------------------------

    async def set_project_quota(self, quota: ProjectQuota) -> None:
        await self._execute(
            "INSERT INTO project_quotas(project, max_running_batches, max_stored_bytes, max_uploads,"
            " monthly_budget_nanos) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project) DO UPDATE SET"
            " max_running_batches = EXCLUDED.max_running_batches, max_stored_bytes = EXCLUDED.max_stored_bytes,"
            " max_uploads = EXCLUDED.max_uploads, monthly_budget_nanos = EXCLUDED.monthly_budget_nanos",
            quota.project, quota.max_running_batches, quota.max_stored_bytes, quota.max_uploads,
            quota.monthly_budget_nanos)

    async def get_project_quota(self, project: str) -> ProjectQuota | None:
        row = await self._fetchrow("SELECT * FROM project_quotas WHERE project = $1", text_param(project))
        return ProjectQuota(**row) if row else None

    async def delete_project_quota(self, project: str) -> bool:
        return await self._execute("DELETE FROM project_quotas WHERE project = $1",
                                   text_param(project)) != "DELETE 0"

    async def stored_bytes(self, project: str) -> int:
        row = await self._fetchrow(_STORED_BYTES, text_param(project))
        return int(row[0])

    async def count_unfinished_batches(self, project: str) -> int:
        row = await self._fetchrow(f"SELECT count(*) FROM batches WHERE status NOT IN {migrations.TERMINAL}"
                                   " AND project = $1 AND parent_id IS NULL", text_param(project))
        return int(row[0])

    # -- files ----------------------------------------------------------------------------

    async def insert_file(self, f: FileRecord, *, max_stored_bytes: int | None = None) -> None:
        """Raises Duplicate when the project has a file with the same request_id."""
        if max_stored_bytes is None:
            await self._execute(_INSERT_FILE, *_file_args(f))
            return
        await self._insert_within(_INSERT_FILE, _file_args(f), _STORED_BYTES, f.project, max_stored_bytes, f.bytes)

    async def _insert_within(self, insert_sql: str, args: tuple, total_sql: str, project: str, limit: int,
                             own: int) -> None:
        """The insert, then the project's total (`total_sql`, the new row included), in one
        transaction that first takes the project's advisory quota lock: at READ COMMITTED two
        transactions could each count before the other commits, the lock makes every limited insert
        of the project, on any server, wait for the last one's commit. Past `limit`: rolled back,
        QuotaReached."""
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", locks.QUOTAS, project)
            await conn.execute(insert_sql, *args)
            total = int(await conn.fetchval(total_sql, project))
            if total > limit:
                raise QuotaReached(total - own)

    async def get_file(self, file_id: str) -> FileRecord | None:
        row = await self._fetchrow(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = $1", text_param(file_id))
        return _file(row) if row else None

    async def get_file_by_request_id(self, project: str, request_id: str) -> FileRecord | None:
        row = await self._fetchrow(f"SELECT {_FILE_COLUMNS} FROM files WHERE project = $1 AND request_id = $2",
                                   text_param(project), utf8(request_id))
        return _file(row) if row else None

    async def list_files(self, project: str | None, purpose: str | None, limit: int,
                         after: tuple[float, str] | None, oldest_first: bool = False) -> list[FileRecord]:
        p = Params()
        conditions = ["merged_into IS NULL", *([f"purpose = {p(text_param(purpose))}"] if purpose else [])]
        sql = _keyset_query(f"SELECT {_FILE_COLUMNS} FROM files", project, conditions, p, after, limit,
                            oldest_first)
        return [_file(r) for r in await self._fetch(sql, *p.values)]

    async def delete_file(self, file_id: str) -> bool:
        status = await self._execute("DELETE FROM files WHERE id = $1", text_param(file_id))
        return status != "DELETE 0"

    async def expired_files(self, now: float, limit: int = 500) -> list[FileRecord]:
        rows = await self._fetch(f"SELECT {_FILE_COLUMNS} FROM files WHERE expires_at IS NOT NULL"
                                 " AND expires_at <= $1 LIMIT $2", now, limit)
        return [_file(r) for r in rows]

    async def all_file_ids(self) -> set[str]:
        return {r["id"] for r in await self._fetch("SELECT id FROM files")}

    async def shard_result_files(self, limit: int = 500) -> list[FileRecord]:
        rows = await self._fetch(f"SELECT {_FILE_COLUMNS} FROM files WHERE merged_into IS NOT NULL LIMIT $1", limit)
        return [_file(r) for r in rows]

    # -- batches --------------------------------------------------------------------------

    async def insert_batch(self, b: BatchRecord, *, owner: str | None = None,
                           max_unfinished: int | None = None) -> None:
        """Raises Duplicate when the project has a batch with the same request_id."""
        args = _batch_args(b, owner)
        if max_unfinished is None:
            await self._execute(_INSERT_BATCH, *args)
            return
        # Shards (parent_id set) are part of their parent's batch: only parents count.
        await self._insert_within(_INSERT_BATCH, args, f"SELECT count(*) FROM batches WHERE status NOT IN"
                                  f" {migrations.TERMINAL} AND project = $1 AND parent_id IS NULL", b.project,
                                  max_unfinished, 1)

    async def split_batch(self, parent: BatchRecord, shards: Sequence[BatchRecord], *, owner: str) -> BatchRecord:
        old = parent.revision
        parent.revision = old + 1
        try:
            async with self._transaction() as conn:
                if await conn.execute(*_update_args(parent, old, owner)) != "UPDATE 1":
                    await self._refused(parent.id, owner)
                await conn.executemany(_INSERT_BATCH, [_batch_args(s, owner) for s in shards])
        except BaseException:
            parent.revision = old
            raise
        return parent

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        row = await self._fetchrow("SELECT doc FROM batches WHERE id = $1", text_param(batch_id))
        return batch_from_doc(row["doc"]) if row else None

    async def refresh_batch(self, known: BatchRecord) -> BatchRecord | None:
        row = await self._fetchrow("SELECT CASE WHEN revision = $2 THEN NULL ELSE doc END AS doc FROM batches"
                                   " WHERE id = $1", text_param(known.id), known.revision)
        if row is None:
            return None
        return known if row["doc"] is None else batch_from_doc(row["doc"])

    async def get_batch_by_request_id(self, project: str, request_id: str) -> BatchRecord | None:
        row = await self._fetchrow("SELECT doc FROM batches WHERE project = $1 AND request_id = $2",
                                   text_param(project), utf8(request_id))
        return batch_from_doc(row["doc"]) if row else None

    async def list_batches(self, project: str | None, statuses: Sequence[BatchStatus], limit: int,
                           after: tuple[float, str] | None) -> list[BatchRecord]:
        p = Params()
        conditions = [f"status = ANY({p(sorted({s.value for s in statuses}))}::text[])"] if statuses else []
        conditions.append("parent_id IS NULL")  # shards are internal (domain/shards.py)
        sql = _keyset_query("SELECT doc FROM batches", project, conditions, p, after, limit)
        return [batch_from_doc(r["doc"]) for r in await self._fetch(sql, *p.values)]

    async def active_batch_reading(self, file_id: str) -> str | None:
        """The id of an unfinished batch whose input is `file_id` (a shard's parent), if any."""
        row = await self._fetchrow(f"SELECT COALESCE(parent_id, id) AS id FROM batches"
                                   f" WHERE status NOT IN {migrations.TERMINAL} AND input_file_id = $1 LIMIT 1",
                                   text_param(file_id))
        return row["id"] if row else None

    async def active_batches(self) -> list[BatchRecord]:
        rows = await self._fetch(f"SELECT doc FROM batches WHERE status NOT IN {migrations.TERMINAL}"
                                 " ORDER BY created_at")
        return [batch_from_doc(r["doc"]) for r in rows]

    async def update_batch(self, b: BatchRecord, *, extra_files: Sequence[FileRecord] = (),
                           ledger: dict[str, Any] | None = None, outbox: Sequence[OutboxEvent] = (),
                           owner: str | None = None) -> BatchRecord:
        """Persist `b` with the revision bump, its result files and its ledger row in one
        transaction. The ledger row is keyed by batch id: it is written at most once, ever.
        Raises RevisionConflict when the stored revision is not b.revision."""
        if ledger is not None and not _LEDGER_COLUMNS.issuperset(ledger):
            raise ValueError(f"not ledger columns: {sorted(set(ledger) - _LEDGER_COLUMNS)}")
        old = b.revision
        b.revision = old + 1
        update = _update_args(b, old, owner)
        try:
            if not extra_files and ledger is None and not outbox:
                # Most changes (progress, status) are this one statement: atomic by itself, one round trip.
                status = await self._execute(*update)
                if status != "UPDATE 1":
                    await self._refused(b.id, owner)
                return b
            async with self._transaction() as conn:
                if await conn.execute(*update) != "UPDATE 1":
                    await self._refused(b.id, owner)
                for f in extra_files:
                    # A redone finalisation may find its result file recorded already.
                    await conn.execute(_INSERT_FILE + " ON CONFLICT (id) DO NOTHING", *_file_args(f))
                if ledger is not None:
                    await _insert_ledger_row(conn, ledger)
                if outbox:
                    await conn.executemany(
                        "INSERT INTO webhook_outbox(event_id, endpoint_id, project, batch_id, event_type, body,"
                        " created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                        " ON CONFLICT (event_id, endpoint_id) DO NOTHING",
                        [(e.event_id, e.endpoint_id, e.project, e.batch_id, e.event_type, e.body, e.created_at,
                          e.next_attempt_at) for e in outbox])
        except BaseException:
            b.revision = old
            raise
        return b


    # -- webhooks -------------------------------------------------------------------------

    async def add_webhook_endpoint(self, e: WebhookEndpoint) -> None:
        await self._execute("INSERT INTO webhook_endpoints(id, project, url, secret, events, created_at)"
                            " VALUES ($1, $2, $3, $4, $5, $6)",
                            e.id, e.project, e.url, e.secret, json.dumps(list(e.events)), e.created_at)

    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        row = await self._fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", text_param(endpoint_id))
        return _endpoint(row) if row else None

    async def list_webhook_endpoints(self, project: str | None) -> list[WebhookEndpoint]:
        if project is None:
            rows = await self._fetch("SELECT * FROM webhook_endpoints ORDER BY created_at, id")
        else:
            rows = await self._fetch("SELECT * FROM webhook_endpoints WHERE project = $1 ORDER BY created_at, id",
                                     text_param(project))
        return [_endpoint(r) for r in rows]

    async def delete_webhook_endpoint(self, endpoint_id: str) -> bool:
        return await self._execute("DELETE FROM webhook_endpoints WHERE id = $1", text_param(endpoint_id)) != "DELETE 0"

    async def claim_outbox(self, owner: str, now: float, lease: float, limit: int) -> list[OutboxEvent]:
        # SKIP LOCKED: a replica claiming at the same moment takes other rows instead of waiting
        # for these and then finding them claimed.
        rows = await self._fetch(
            "UPDATE webhook_outbox SET claimed_by = $1, claimed_until = $2 WHERE (event_id, endpoint_id) IN ("
            " SELECT event_id, endpoint_id FROM webhook_outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
            " AND next_attempt_at <= $3 AND (claimed_until IS NULL OR claimed_until <= $3)"
            " ORDER BY next_attempt_at, created_at LIMIT $4 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_OUTBOX_COLUMNS}", owner, now + lease, now, limit)
        return sorted((_outbox_event(r) for r in rows), key=lambda e: (e.next_attempt_at, e.created_at))

    async def outbox_delivered(self, event_id: str, endpoint_id: str, now: float) -> None:
        await self._execute(
            "UPDATE webhook_outbox SET delivered_at = $1, attempts = attempts + 1, claimed_by = NULL,"
            " claimed_until = NULL, last_error = '' WHERE event_id = $2 AND endpoint_id = $3 AND delivered_at IS NULL",
            now, event_id, endpoint_id)

    async def outbox_failed(self, event_id: str, endpoint_id: str, owner: str, error: str,
                            retry_at: float | None, now: float) -> None:
        await self._execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $1,"
            " next_attempt_at = coalesce($2, next_attempt_at),"
            " given_up_at = CASE WHEN $2::double precision IS NULL THEN $3::double precision END,"
            " claimed_by = NULL, claimed_until = NULL"
            " WHERE event_id = $4 AND endpoint_id = $5 AND claimed_by = $6 AND delivered_at IS NULL",
            error, retry_at, now, event_id, endpoint_id, owner)

    async def outbox_events(self, batch_id: str) -> list[OutboxEvent]:
        rows = await self._fetch(f"SELECT {_OUTBOX_COLUMNS} FROM webhook_outbox WHERE batch_id = $1"
                                 " ORDER BY created_at, endpoint_id", text_param(batch_id))
        return [_outbox_event(r) for r in rows]


_OUTBOX_COLUMNS = ("event_id, endpoint_id, project, batch_id, event_type, body, created_at, attempts, next_attempt_at,"
                   " delivered_at, given_up_at, last_error")


_INSERT_BATCH = ("INSERT INTO batches(id, project, status, created_at, request_id, input_file_id, revision, doc, owner,"
                 " parent_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")


def _batch_args(b: BatchRecord, owner: str | None) -> tuple:
    return (b.id, b.project, b.status.value, b.created_at, utf8(b.request_id) if b.request_id else None,
            b.input_file_id, b.revision, batch_to_doc(b), owner, b.parent_id or None)


def _update_args(b: BatchRecord, old: int, owner: str | None) -> tuple:
    """The compare-and-set UPDATE of `b` (at its new revision) over revision `old`, fenced by the
    lease of `owner` when given (store/postgres/leases.py)."""
    update: tuple = ("UPDATE batches SET status = $1, revision = $2, doc = $3 WHERE id = $4 AND revision = $5",
                     b.status.value, b.revision, batch_to_doc(b), b.id, old)
    if owner is not None:
        update = (update[0] + " AND owner = $6", *update[1:], owner)
    return update


def _outbox_event(row: asyncpg.Record) -> OutboxEvent:
    return OutboxEvent(**dict(row))


def _endpoint(row: asyncpg.Record) -> WebhookEndpoint:
    return WebhookEndpoint(id=row["id"], project=row["project"], url=row["url"], secret=row["secret"],
                           events=tuple(json.loads(row["events"])), created_at=row["created_at"])

async def _insert_ledger_row(conn: asyncpg.Connection, row: dict[str, Any]) -> None:
    """The batch's ledger row, unless it has one (at most once, ever), with its metadata pairs.
    Under the LEDGER lock until the transaction ends: rows commit in the order of their seq."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", locks.NAMESPACE, locks.LEDGER)
    columns = list(row)
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    inserted = await conn.fetchval(
        f"INSERT INTO usage_ledger({', '.join(columns)}) VALUES ({values})"
        " ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id", *row.values())
    if inserted is None:
        return
    pairs = json.loads(row.get("metadata") or "{}")
    if pairs:
        await conn.executemany("INSERT INTO usage_ledger_metadata(batch_id, key, value) VALUES ($1, $2, $3)",
                               [(row["batch_id"], utf8(k), utf8(str(v))) for k, v in pairs.items()])
