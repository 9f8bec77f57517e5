"""The metadata store on SQLite (store.ports.MetadataStore): aiosqlite, WAL mode, versioned schema.

Batches keep their queryable fields as columns and the whole record as a JSON
document, so most later changes need no migration. Every batch change bumps
`revision` in the same statement (compare-and-set on the old revision), which is
what WatchBatch resumes from.

Every SQLite error leaves here as a StorageError (store/errors.py, via store/sqlite/errors.py). A full disk is StorageFull
for every write but a delete, so space can always be freed (see delete_file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite

from batchgate_server.domain.models import ApiKeyRecord, BatchRecord, BatchStatus, FileRecord, ProjectQuota
from batchgate_server.domain.webhooks import OutboxEvent, WebhookEndpoint
from batchgate_server.store.codec import batch_from_doc, batch_to_doc, file_from_row, groups_to_json
from batchgate_server.store.errors import LeaseLost, QuotaReached, RevisionConflict, StorageError, StorageFull
from batchgate_server.store.ports import MetadataStore
from batchgate_server.store.sqlite.changes import LatestRevisions, LocalChangeFeed
from batchgate_server.store.sqlite.errors import storage_errors
from batchgate_server.store.sqlite.reserve import RESERVE_BYTES, SpaceReserve

log = logging.getLogger(__name__)

# Each entry migrates from version i to i+1. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        line_count INTEGER NOT NULL DEFAULT 0,
        endpoint TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        request_id TEXT
    );
    CREATE UNIQUE INDEX files_request_id ON files(project, request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX files_project_created ON files(project, created_at DESC, id DESC);
    CREATE INDEX files_expires ON files(expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        project TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );

    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        request_id TEXT,
        revision INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE UNIQUE INDEX batches_request_id ON batches(project, request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX batches_project_created ON batches(project, created_at DESC, id DESC);
    CREATE INDEX batches_status ON batches(status);
    """,
    """
    CREATE TABLE usage_ledger (
        batch_id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        api_key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost_status TEXT NOT NULL,
        cost_amount TEXT NOT NULL,
        metadata TEXT NOT NULL,
        usage_by_model TEXT NOT NULL
    );
    CREATE INDEX usage_ledger_ended ON usage_ledger(ended_at);
    CREATE INDEX usage_ledger_project ON usage_ledger(project, ended_at)
    """,
    # cost_nanos: a known cost in integer 1e-9 USD (cost amounts are rounded to nano-dollars), so
    # QueryUsage sums costs exactly in SQL. NULL when the cost is unknown. Rows written before this
    # migration are converted from their decimal string exactly, digit by digit (no REAL on the way).
    """
    ALTER TABLE usage_ledger ADD COLUMN cost_nanos INTEGER;
    UPDATE usage_ledger SET cost_nanos = CASE
        WHEN cost_status != 'known' OR cost_amount = '' OR cost_amount GLOB '*[^0-9.]*'
             OR cost_amount GLOB '*.*.*' THEN NULL
        WHEN instr(cost_amount, '.') = 0 THEN CAST(cost_amount AS INTEGER) * 1000000000
        WHEN length(cost_amount) - instr(cost_amount, '.') > 9 THEN NULL
        ELSE CAST(substr(cost_amount, 1, instr(cost_amount, '.') - 1) AS INTEGER) * 1000000000
             + CAST(substr(substr(cost_amount, instr(cost_amount, '.') + 1) || '000000000', 1, 9) AS INTEGER)
    END
    """,
    # Secrets shared by every server on this database (the page-token signing key), each created
    # on first use by server_secret.
    """
    CREATE TABLE server_secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        created_at REAL NOT NULL
    )
    """,
    # Named, expiring keys with a last-use time; per-project quotas set through AdminService.
    # files_project_bytes covers SUM(bytes) per project (stored_bytes): the sum reads the index,
    # not the rows.
    """
    ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT '';
    ALTER TABLE api_keys ADD COLUMN expires_at REAL;
    ALTER TABLE api_keys ADD COLUMN last_used_at REAL;
    CREATE INDEX api_keys_project_created ON api_keys(project, created_at DESC, key_id DESC);
    CREATE TABLE project_quotas (
        project TEXT PRIMARY KEY,
        max_running_batches INTEGER,
        max_stored_bytes INTEGER,
        max_uploads INTEGER,
        monthly_budget_nanos INTEGER
    );
    CREATE INDEX files_project_bytes ON files(project, bytes)
    """,
    # Webhook endpoints added through WebhookService, and the outbox: one row per event and
    # endpoint, written in the batch's terminal transaction and claimed by a deliverer (claimed_by
    # until claimed_until) so two replicas do not send it at once.
    """
    CREATE TABLE webhook_endpoints (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX webhook_endpoints_project ON webhook_endpoints(project, created_at);
    CREATE TABLE webhook_outbox (
        event_id TEXT NOT NULL,
        endpoint_id TEXT NOT NULL,
        project TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        claimed_by TEXT,
        claimed_until REAL,
        delivered_at REAL,
        given_up_at REAL,
        last_error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (event_id, endpoint_id)
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox(next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    CREATE INDEX webhook_outbox_batch ON webhook_outbox(batch_id)
    """,
    # Replicas sharing this database (core/ownership.py): each unfinished batch is owned by the
    # replica that drives it, for as long as that replica's lease (renewed by its heartbeat) lasts.
    # executor_results: what the built-in executor answered, in segments any replica can read back.
    """
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        lease_expires REAL NOT NULL
    );
    ALTER TABLE batches ADD COLUMN owner TEXT;
    CREATE INDEX batches_active_owner ON batches(owner)
        WHERE status NOT IN ('failed', 'completed', 'expired', 'cancelled');
    CREATE TABLE executor_results (
        batch_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        writer TEXT NOT NULL,
        output BLOB NOT NULL,
        errors BLOB NOT NULL,
        PRIMARY KEY (batch_id, seq)
    )
    """,
    # A batch file's lines by (url, body.model) (issue 14: files may mix endpoints and models),
    # JSON (store/codec.py groups_to_json). NULL on files stored before: their one group is the
    # row's endpoint, model and line_count.
    """
    ALTER TABLE files ADD COLUMN line_groups TEXT
    """,
    # Sharded batches (domain/shards.py): a shard's row names its parent, so listings and quotas
    # see parents only; a shard's ledger row names the parent too, so usage counts the batch once.
    """
    ALTER TABLE batches ADD COLUMN parent_id TEXT;
    CREATE INDEX batches_parent ON batches(parent_id) WHERE parent_id IS NOT NULL;
    ALTER TABLE usage_ledger ADD COLUMN parent_batch_id TEXT
    """,
    # Prompt-cache writes (parts of input_tokens; the 1-hour ones a part of those): QueryUsage sums them.
    """
    ALTER TABLE usage_ledger ADD COLUMN cache_creation_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_ledger ADD COLUMN cache_creation_1h_tokens INTEGER NOT NULL DEFAULT 0
    """,
    # A shard's result files name the parent that merges them (FileRecord.merged_into): callers'
    # listings and stored bytes leave them out (the partial index still covers SUM(bytes)), and
    # the sweep finds those whose parent has ended.
    """
    ALTER TABLE files ADD COLUMN merged_into TEXT;
    DROP INDEX files_project_bytes;
    CREATE INDEX files_project_bytes ON files(project, bytes) WHERE merged_into IS NULL;
    CREATE INDEX files_merged_into ON files(merged_into) WHERE merged_into IS NOT NULL
    """,
]
_TERMINAL = tuple(s.value for s in BatchStatus if s.is_terminal)
_ACTIVE = f"status NOT IN ({','.join(repr(s) for s in _TERMINAL)})"

OUTBOX_COLUMNS = ("event_id", "endpoint_id", "project", "batch_id", "event_type", "body", "created_at", "attempts",
                  "next_attempt_at", "delivered_at", "given_up_at", "last_error")


# The document only when the stored revision is not the caller's (see refresh_batch).
_REFRESH_BATCH = "SELECT revision, CASE WHEN revision=? THEN NULL ELSE doc END FROM batches WHERE id=?"
_INSERT_BATCH = ("INSERT INTO batches(id, project, status, created_at, request_id, revision, doc, owner, parent_id)"
                 " VALUES (?,?,?,?,?,?,?,?,?)")


def _batch_args(b: BatchRecord, owner: str | None) -> tuple:
    return (b.id, b.project, b.status.value, b.created_at, b.request_id or None, b.revision, batch_to_doc(b),
            owner, b.parent_id or None)


def _outbox_event(row: sqlite3.Row) -> OutboxEvent:
    return OutboxEvent(**{c: row[c] for c in OUTBOX_COLUMNS})


def _endpoint(row: sqlite3.Row) -> WebhookEndpoint:
    return WebhookEndpoint(id=row["id"], project=row["project"], url=row["url"], secret=row["secret"],
                           events=tuple(json.loads(row["events"])), created_at=row["created_at"])

QUOTA_COLUMNS = ("max_running_batches", "max_stored_bytes", "max_uploads", "monthly_budget_nanos")
API_KEY_SELECT = ("SELECT key_id AS id, project, created_at, name, expires_at, revoked_at, last_used_at"
                  " FROM api_keys")


def _keyset_query(select: str, project: str | None, conditions: list[tuple[str, list[Any]]],
                  after: tuple[float, str] | None, limit: int, oldest_first: bool = False,
                  id_column: str = "id") -> tuple[str, list[Any]]:
    """`select` filtered by project (None: all) and `conditions` (SQL, args), newest first (or
    oldest first), from after the keyset cursor (created_at, id), at most `limit` rows."""
    sql, args = select + " WHERE 1=1", []
    if project is not None:
        sql += " AND project=?"
        args.append(project)
    for condition, values in conditions:
        sql += " AND " + condition
        args += values
    if after:
        beyond = ">" if oldest_first else "<"
        sql += f" AND (created_at {beyond} ? OR (created_at = ? AND {id_column} {beyond} ?))"
        args += [after[0], after[0], after[1]]
    direction = "ASC" if oldest_first else "DESC"
    sql += f" ORDER BY created_at {direction}, {id_column} {direction} LIMIT ?"
    args.append(limit)
    return sql, args


# A project's stored bytes, as its quota counts them: shards' result files are the service's own.
_STORED_BYTES = "SELECT coalesce(sum(bytes), 0) FROM files WHERE project=? AND merged_into IS NULL"


# Read-only connections, one per reader thread: reads of different RPCs run side by side (SQLite
# releases the GIL while it steps), so a long read (a big ListFiles page, a usage query) does not
# queue every GetBatch behind it. On the 2-core machine 1 and 4 measure the same (bench/reads.py).
READERS = 4


class ReaderPool:
    """Read-only connections, each on its own thread and serving one statement at a time, run to
    its end and closed before the next. In WAL mode a connection keeps its read snapshot while
    any statement on it is open: one connection shared by interleaving coroutines always has one
    open, so it went on reading an old snapshot for seconds and missed writes that had returned.
    Here every read starts a fresh snapshot, so it sees every commit before it (and only commits:
    nobody reads a batch state whose transaction may still roll back)."""

    def __init__(self, path: Path, size: int = READERS) -> None:
        self._path = path
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self._inline: sqlite3.Connection | None = None  # point reads on the event loop's thread

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._local.conn = conn
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    def _fetchall(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        with storage_errors():
            cur = self._connection().execute(sql, args)
            try:
                return cur.fetchall()
            finally:
                cur.close()

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._fetchall, sql, args)

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    async def point_read(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        """fetchone for a read of one row by its key, run on the calling thread: a few
        microseconds on a page SQLite has cached, where a reader thread's round trip costs tens
        (it kept GetBatch at 59-80% of a bare health check's rate). Never waits on a lock: when
        SQLite would (SQLITE_BUSY, e.g. while another connection recovers the WAL index) the
        read goes to a reader thread instead. Like every read here it sees every commit before it."""
        rows = self.read_inline(sql, args)
        if rows is None:
            rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    def read_inline(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row] | None:
        """The rows of `sql` read on the calling thread (no other coroutine runs meanwhile), or
        None where SQLite would wait (SQLITE_BUSY): then the caller reads on a reader thread."""
        try:
            return self._read_inline(sql, args)
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                with storage_errors():  # converted on the error path only: the context costs µs
                    raise
            return None
        except Exception:
            with storage_errors():
                raise

    def _read_inline(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        conn = self._inline
        if conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=0")  # SQLITE_BUSY at once, never a wait on the loop
            with self._opened_lock:
                self._opened.append(conn)
            self._inline = conn
        cur = conn.execute(sql, args)
        try:
            return cur.fetchall()  # to the end: the statement resets and holds no snapshot
        finally:
            cur.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._threads.shutdown, wait=True)
        for conn in self._opened:
            conn.close()


async def _connect(path: Path, reserve: SpaceReserve) -> aiosqlite.Connection:
    """The writer connection; on a full disk with the space reserve released if need be."""
    try:
        return await _connect_once(path)
    except StorageError as err:
        if reserve.held:
            reserve.release("to open the database")
            return await _connect(path, reserve)
        if shutil.disk_usage(path.parent).free == 0:  # SQLite calls it a disk I/O error
            raise StorageFull(f"no space left on the disk to open {path} ({err})") from err
        raise


async def _connect_once(path: Path) -> aiosqlite.Connection:
    with storage_errors():
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            await db.close()  # its thread would keep the process alive
            raise
    return db


class SqliteMetadataStore(MetadataStore):
    def __init__(self, db: aiosqlite.Connection, readers: ReaderPool, reserve: SpaceReserve,
                 changes: LocalChangeFeed) -> None:
        self.db = db
        self.readers = readers
        self.reserve = reserve
        # Every committed batch change is announced here (in this process only: servers in one
        # process on one database file hear each other; separate processes poll, see WatchHub).
        self.changes = changes
        # The newest revisions heard, while this process is the database's only writer
        # (assume_sole_writer): refresh_batch of an unchanged batch then reads nothing.
        self._latest: LatestRevisions | None = None
        self._unsubscribe_latest = lambda: None
        # One writer connection serves the whole server: a statement issued while another
        # coroutine's transaction is open would silently join it. Every write (and every
        # transaction) holds this lock.
        self._write = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Hold the write lock; SQLite errors leave as StorageErrors. Refills the space reserve
        first when a delete on a full disk used it up."""
        async with self._write:
            if self.reserve.short:
                await asyncio.to_thread(self.reserve.refill)
            with storage_errors():
                yield

    async def _exec(self, sql: str, args=()) -> aiosqlite.Cursor:
        async with self._writing():
            return await self.db.execute(sql, args)

    @classmethod
    async def open(cls, path: Path, reserve_bytes: int = RESERVE_BYTES) -> "SqliteMetadataStore":
        """On a disk full to the last byte SQLite cannot even open the database (it creates its
        WAL and shared-memory files): the space reserve the last run left is released for it, so
        the server still starts, and serves reads and deletes."""
        reserve = SpaceReserve(path.with_name(path.name + "-reserve"), reserve_bytes)
        db = await _connect(path, reserve)
        await asyncio.to_thread(reserve.refill)
        if reserve.short:
            log.warning("the disk is nearly full: only %d of %d reserved bytes at %s", reserve.held,
                        reserve.size, reserve.path)
        store = cls(db, ReaderPool(path), reserve, LocalChangeFeed.for_database(path))
        try:
            await store.migrate()
        except BaseException:
            await store.close()  # the connection's thread would keep the process alive
            raise
        return store

    async def close(self) -> None:
        self._unsubscribe_latest()
        await self.readers.close()
        await self.db.close()

    async def schema_version(self) -> int:
        with storage_errors():
            [row] = await self.db.execute_fetchall("PRAGMA user_version")
        return int(row[0])

    async def migrate(self) -> None:
        """Each step reads the version inside its own write transaction: servers starting together
        on one database file take turns, and each step runs once."""
        while True:
            with storage_errors():
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    version = await self.schema_version()
                    if version > len(MIGRATIONS):
                        raise RuntimeError(
                            f"database schema version {version} is newer than this server ({len(MIGRATIONS)})")
                    if version == len(MIGRATIONS):
                        await self.db.execute("COMMIT")
                        return
                    log.info("migrating metadata schema to version %d", version + 1)
                    for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                        await self.db.execute(statement)
                    await self.db.execute(f"PRAGMA user_version={version + 1}")
                    await self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:
                        await self.db.execute("ROLLBACK")
                    raise

    # -- server secrets -------------------------------------------------------------

    async def server_secret(self, name: str) -> bytes:
        """The secret `name` (32 random bytes): the first server to ask creates it, every later
        start and every other server on this database reads the same one."""
        async with self._write:
            await self.db.execute("INSERT OR IGNORE INTO server_secrets(name, value, created_at) VALUES (?,?,?)",
                                  (name, secrets.token_bytes(32), time.time()))
            async with self.db.execute("SELECT value FROM server_secrets WHERE name=?", (name,)) as cur:
                row = await cur.fetchone()
        return bytes(row[0])

    # -- api keys -------------------------------------------------------------------

    async def add_api_key(self, key_hash: str, key: ApiKeyRecord) -> None:
        await self._exec(
            "INSERT INTO api_keys(key_hash, key_id, project, created_at, name, expires_at) VALUES (?,?,?,?,?,?)",
            (key_hash, key.id, key.project, key.created_at, key.name, key.expires_at),
        )

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self.readers.point_read(API_KEY_SELECT + " WHERE key_hash=?", (key_hash,))
        return ApiKeyRecord(**row) if row else None

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = await self.readers.fetchone(API_KEY_SELECT + " WHERE key_id=?", (key_id,))
        return ApiKeyRecord(**row) if row else None

    async def list_api_keys(self, project: str | None, limit: int,
                            after: tuple[float, str] | None) -> list[ApiKeyRecord]:
        sql, args = _keyset_query(API_KEY_SELECT, project, [], after, limit, id_column="key_id")
        return [ApiKeyRecord(**r) for r in await self.readers.fetchall(sql, args)]

    async def revoke_api_key(self, key_id: str, now: float) -> ApiKeyRecord | None:
        await self._exec("UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL", (now, key_id))
        return await self.get_api_key(key_id)

    async def touch_api_key(self, key_id: str, now: float) -> None:
        await self._exec("UPDATE api_keys SET last_used_at=? WHERE key_id=?", (now, key_id))

    async def count_api_keys(self) -> int:
        row = await self.readers.fetchone("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0])

    # -- project quotas ---------------------------------------------------------------

    async def set_project_quota(self, quota: ProjectQuota) -> None:
        await self._exec(
            f"INSERT OR REPLACE INTO project_quotas(project, {','.join(QUOTA_COLUMNS)}) VALUES (?,?,?,?,?)",
            (quota.project, *(getattr(quota, c) for c in QUOTA_COLUMNS)))

    async def get_project_quota(self, project: str) -> ProjectQuota | None:
        row = await self.readers.fetchone("SELECT * FROM project_quotas WHERE project=?", (project,))
        return ProjectQuota(**row) if row else None

    async def delete_project_quota(self, project: str) -> bool:
        cur = await self._exec("DELETE FROM project_quotas WHERE project=?", (project,))
        return cur.rowcount > 0

    async def stored_bytes(self, project: str) -> int:
        row = await self.readers.fetchone(_STORED_BYTES, (project,))
        return int(row[0])

    async def count_unfinished_batches(self, project: str) -> int:
        terminal = [s.value for s in BatchStatus if s.is_terminal]
        row = await self.readers.fetchone(
            f"SELECT count(*) FROM batches WHERE project=? AND parent_id IS NULL"
            f" AND status NOT IN ({','.join('?' * len(terminal))})",
            (project, *terminal))
        return int(row[0])

    # -- files ----------------------------------------------------------------------

    async def insert_file(self, f: FileRecord, *, max_stored_bytes: int | None = None) -> None:
        """Raises Duplicate when the project has a file with the same request_id."""
        async with self._writing():
            if max_stored_bytes is None:
                await self._insert_file(f)
                return
            await self._insert_within(lambda: self._insert_file(f), _STORED_BYTES, (f.project,), max_stored_bytes,
                                      f.bytes)

    async def _insert_within(self, insert: Callable[[], Awaitable[Any]], total_sql: str, args: tuple,
                             limit: int, own: int) -> None:
        """`insert`, then the project's total (`total_sql`, the new row included), in one BEGIN
        IMMEDIATE transaction: the database's write lock keeps every other writer out between the
        two, those of other processes on the file too. Past `limit`: rolled back, QuotaReached."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await insert()
            async with self.db.execute(total_sql, args) as cur:
                total = int((await cur.fetchone())[0])
            if total > limit:
                raise QuotaReached(total - own)
            await self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                await self.db.execute("ROLLBACK")
            raise

    async def _insert_file(self, f: FileRecord) -> None:
        await self.db.execute(
            "INSERT INTO files(id, project, filename, purpose, bytes, sha256, created_at, expires_at,"
            " line_count, endpoint, model, request_id, line_groups, merged_into) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (f.id, f.project, f.filename, f.purpose.value, f.bytes, f.sha256, f.created_at, f.expires_at,
             f.line_count, f.endpoint, f.model, f.request_id or None, groups_to_json(f.groups),
             f.merged_into or None),
        )

    async def get_file(self, file_id: str) -> FileRecord | None:
        row = await self.readers.fetchone("SELECT * FROM files WHERE id=?", (file_id,))
        return file_from_row(row) if row else None

    async def get_file_by_request_id(self, project: str, request_id: str) -> FileRecord | None:
        row = await self.readers.fetchone("SELECT * FROM files WHERE project=? AND request_id=?",
                                          (project, request_id))
        return file_from_row(row) if row else None

    async def list_files(self, project: str | None, purpose: str | None, limit: int,
                         after: tuple[float, str] | None, oldest_first: bool = False) -> list[FileRecord]:
        conditions = [("merged_into IS NULL", []), *([("purpose=?", [purpose])] if purpose else [])]
        sql, args = _keyset_query("SELECT * FROM files", project, conditions, after, limit, oldest_first)
        return [file_from_row(r) for r in await self.readers.fetchall(sql, args)]

    async def delete_file(self, file_id: str) -> bool:
        """Works on a full disk too (see below)."""
        delete = "DELETE FROM files WHERE id=?"
        async with self._writing():
            for make_room in (self._restart_wal, self._release_reserve, None):
                try:
                    with storage_errors():
                        cur = await self.db.execute(delete, (file_id,))
                    break
                except StorageFull:
                    if make_room is None:
                        raise
                    await make_room()
        return cur.rowcount > 0

    # A delete appends its pages to the write-ahead log, which on a full disk has no room to grow.
    # First the WAL is checkpointed and restarted: the next transaction overwrites it from its
    # start, in blocks the file already has. A checkpoint that itself needs room (pages the
    # database file does not have yet) gets the space reserve.

    async def _restart_wal(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # a checkpoint that cannot finish is retried later
            await self.db.execute_fetchall("PRAGMA wal_checkpoint(RESTART)")

    async def _release_reserve(self) -> None:
        await asyncio.to_thread(self.reserve.release, "so a delete can free space")
        await self._restart_wal()

    async def expired_files(self, now: float, limit: int = 500) -> list[FileRecord]:
        rows = await self.readers.fetchall(
            "SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?", (now, limit))
        return [file_from_row(r) for r in rows]

    async def all_file_ids(self) -> set[str]:
        return {r[0] for r in await self.readers.fetchall("SELECT id FROM files")}

    async def shard_result_files(self, limit: int = 500) -> list[FileRecord]:
        rows = await self.readers.fetchall("SELECT * FROM files WHERE merged_into IS NOT NULL LIMIT ?", (limit,))
        return [file_from_row(r) for r in rows]

    # -- batches --------------------------------------------------------------------

    async def insert_batch(self, b: BatchRecord, *, owner: str | None = None,
                           max_unfinished: int | None = None) -> None:
        """Raises Duplicate when the project has a batch with the same request_id. `owner`: the
        replica that will drive the batch (it holds the lease from the start)."""
        args = _batch_args(b, owner)
        if max_unfinished is None:
            await self._exec(_INSERT_BATCH, args)
            return
        terminal = [s.value for s in BatchStatus if s.is_terminal]
        async with self._writing():
            # Shards (parent_id set) are part of their parent's batch: only parents count.
            await self._insert_within(
                lambda: self.db.execute(_INSERT_BATCH, args),
                f"SELECT count(*) FROM batches WHERE project=? AND parent_id IS NULL"
                f" AND status NOT IN ({','.join('?' * len(terminal))})",
                (b.project, *terminal), max_unfinished, 1)

    async def split_batch(self, parent: BatchRecord, shards: Sequence[BatchRecord], *, owner: str) -> BatchRecord:
        async with self._writing():
            old = parent.revision
            parent.revision = old + 1
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self._fenced_update(parent, old, owner)
                await self.db.executemany(_INSERT_BATCH, [_batch_args(s, owner) for s in shards])
                await self.db.execute("COMMIT")
            except BaseException:
                parent.revision = old
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise
        self.changes.notify(parent.id, parent.revision)
        return parent

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        row = await self.readers.point_read("SELECT doc FROM batches WHERE id=?", (batch_id,))
        return batch_from_doc(row[0]) if row else None

    def assume_sole_writer(self) -> None:
        if self._latest is None:
            self._latest = LatestRevisions()
            self._unsubscribe_latest = self.changes.subscribe(self._latest.heard)

    async def refresh_batch(self, known: BatchRecord) -> BatchRecord | None:
        latest = self._latest
        if latest is not None and latest.get(known.id) == known.revision:
            return known  # the sole writer's feed has announced no newer revision
        args = (known.revision, known.id)
        rows = self.readers.read_inline(_REFRESH_BATCH, args)
        if rows is None:
            rows = await self.readers.fetchall(_REFRESH_BATCH, args)
        elif rows and latest is not None:
            # Read with no coroutine between it and the feed: any later write is heard after it.
            latest.heard(known.id, rows[0][0])
        if not rows:
            return None
        return known if rows[0][1] is None else batch_from_doc(rows[0][1])

    async def get_batch_by_request_id(self, project: str, request_id: str) -> BatchRecord | None:
        row = await self.readers.fetchone("SELECT doc FROM batches WHERE project=? AND request_id=?",
                                          (project, request_id))
        return batch_from_doc(row[0]) if row else None

    async def list_batches(self, project: str | None, statuses: Sequence[BatchStatus], limit: int,
                           after: tuple[float, str] | None) -> list[BatchRecord]:
        conditions = ([(f"status IN ({','.join('?' * len(statuses))})", [s.value for s in statuses])]
                      if statuses else [])
        conditions.append(("parent_id IS NULL", []))  # shards are internal (domain/shards.py)
        sql, args = _keyset_query("SELECT doc FROM batches", project, conditions, after, limit)
        return [batch_from_doc(r[0]) for r in await self.readers.fetchall(sql, args)]

    async def active_batch_reading(self, file_id: str) -> str | None:
        """The id of an unfinished batch whose input is `file_id` (a shard's parent), if any."""
        terminal = [s.value for s in BatchStatus if s.is_terminal]
        row = await self.readers.fetchone(
            f"SELECT COALESCE(parent_id, id) FROM batches WHERE status NOT IN ({','.join('?' * len(terminal))})"
            " AND json_extract(doc, '$.input_file_id') = ? LIMIT 1", (*terminal, file_id))
        return row[0] if row else None

    async def active_batches(self) -> list[BatchRecord]:
        terminal = [s.value for s in BatchStatus if s.is_terminal]
        rows = await self.readers.fetchall(
            f"SELECT doc FROM batches WHERE status NOT IN ({','.join('?' * len(terminal))})"
            " ORDER BY created_at", terminal)
        return [batch_from_doc(r[0]) for r in rows]

    async def update_batch(self, b: BatchRecord, *, extra_files: Sequence[FileRecord] = (),
                           ledger: dict[str, Any] | None = None, outbox: Sequence[OutboxEvent] = (),
                           owner: str | None = None) -> BatchRecord:
        """Persist `b` with the revision bump, its result files and its ledger row in one
        transaction. The ledger row is keyed by batch id: it is written at most once, ever.
        Raises RevisionConflict when the stored revision is not b.revision. `owner`: write only
        while that replica owns the batch (LeaseLost otherwise), so a replica that lost its lease
        can never overwrite the work of the one that adopted the batch."""
        async with self._writing():
            await self._update_batch(b, extra_files, ledger, outbox, owner)
        self.changes.notify(b.id, b.revision)
        return b

    async def _update_batch(self, b: BatchRecord, extra_files: Sequence[FileRecord], ledger: dict[str, Any] | None,
                            outbox: Sequence[OutboxEvent], owner: str | None) -> None:
        old = b.revision
        b.revision = old + 1
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self._fenced_update(b, old, owner)
            for f in extra_files:
                # A redone finalisation may find its result file recorded already.
                async with self.db.execute("SELECT 1 FROM files WHERE id=?", (f.id,)) as existing:
                    recorded = await existing.fetchone() is not None
                if not recorded:
                    await self._insert_file(f)
            if ledger is not None:
                columns = ",".join(ledger)
                await self.db.execute(
                    f"INSERT OR IGNORE INTO usage_ledger({columns}) VALUES ({','.join('?' * len(ledger))})",
                    tuple(ledger.values()))
            for e in outbox:
                await self.db.execute(
                    "INSERT OR IGNORE INTO webhook_outbox(event_id, endpoint_id, project, batch_id, event_type,"
                    " body, created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?,?)",
                    (e.event_id, e.endpoint_id, e.project, e.batch_id, e.event_type, e.body, e.created_at,
                     e.next_attempt_at))
            await self.db.execute("COMMIT")
        except BaseException:
            b.revision = old
            if self.db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                await self.db.execute("ROLLBACK")
            raise

    async def _fenced_update(self, b: BatchRecord, old: int, owner: str | None) -> None:
        """UPDATE `b` (already at its new revision) over revision `old`, inside the open
        transaction: RevisionConflict, or LeaseLost when `owner` no longer owns it."""
        sql = "UPDATE batches SET status=?, revision=?, doc=? WHERE id=? AND revision=?"
        args: tuple = (b.status.value, b.revision, batch_to_doc(b), b.id, old)
        if owner is not None:
            sql += " AND owner=?"
            args += (owner,)
        cur = await self.db.execute(sql, args)
        if cur.rowcount != 1:
            if owner is not None:
                async with self.db.execute("SELECT owner FROM batches WHERE id=?", (b.id,)) as found:
                    row = await found.fetchone()
                if row is not None and row[0] != owner:
                    raise LeaseLost(b.id)
            raise RevisionConflict(b.id)

    # -- webhooks -------------------------------------------------------------------

    async def add_webhook_endpoint(self, e: WebhookEndpoint) -> None:
        await self._exec(
            "INSERT INTO webhook_endpoints(id, project, url, secret, events, created_at) VALUES (?,?,?,?,?,?)",
            (e.id, e.project, e.url, e.secret, json.dumps(list(e.events)), e.created_at))

    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        row = await self.readers.fetchone("SELECT * FROM webhook_endpoints WHERE id=?", (endpoint_id,))
        return _endpoint(row) if row else None

    async def list_webhook_endpoints(self, project: str | None) -> list[WebhookEndpoint]:
        sql, args = "SELECT * FROM webhook_endpoints", ()
        if project is not None:
            sql, args = sql + " WHERE project=?", (project,)
        return [_endpoint(r) for r in await self.readers.fetchall(sql + " ORDER BY created_at, id", args)]

    async def delete_webhook_endpoint(self, endpoint_id: str) -> bool:
        cur = await self._exec("DELETE FROM webhook_endpoints WHERE id=?", (endpoint_id,))
        return cur.rowcount > 0

    async def claim_outbox(self, owner: str, now: float, lease: float, limit: int) -> list[OutboxEvent]:
        # One statement: SQLite runs it under the database's write lock, so claims never overlap.
        async with self._writing():
            rows = await self.db.execute_fetchall(
                "UPDATE webhook_outbox SET claimed_by=?, claimed_until=? WHERE rowid IN ("
                " SELECT rowid FROM webhook_outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
                " AND next_attempt_at <= ? AND (claimed_until IS NULL OR claimed_until <= ?)"
                " ORDER BY next_attempt_at, created_at LIMIT ?)"
                f" RETURNING {', '.join(OUTBOX_COLUMNS)}",
                (owner, now + lease, now, now, limit))
        return sorted((_outbox_event(r) for r in rows), key=lambda e: (e.next_attempt_at, e.created_at))

    async def outbox_delivered(self, event_id: str, endpoint_id: str, now: float) -> None:
        await self._exec(
            "UPDATE webhook_outbox SET delivered_at=?, attempts=attempts+1, claimed_by=NULL, claimed_until=NULL,"
            " last_error='' WHERE event_id=? AND endpoint_id=? AND delivered_at IS NULL",
            (now, event_id, endpoint_id))

    async def outbox_failed(self, event_id: str, endpoint_id: str, owner: str, error: str,
                            retry_at: float | None, now: float) -> None:
        await self._exec(
            "UPDATE webhook_outbox SET attempts=attempts+1, last_error=?, next_attempt_at=COALESCE(?, next_attempt_at),"
            " given_up_at=CASE WHEN ? IS NULL THEN ? END, claimed_by=NULL, claimed_until=NULL"
            " WHERE event_id=? AND endpoint_id=? AND claimed_by=? AND delivered_at IS NULL",
            (error, retry_at, retry_at, now, event_id, endpoint_id, owner))

    async def outbox_events(self, batch_id: str) -> list[OutboxEvent]:
        rows = await self.readers.fetchall(
            f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM webhook_outbox WHERE batch_id=? ORDER BY created_at, endpoint_id",
            (batch_id,))
        return [_outbox_event(r) for r in rows]

    # -- replicas and leases (core/ownership.py) ------------------------------------------

    async def renew_lease(self, replica: str, now: float, expires: float) -> None:
        """Extend every lease of `replica` to `expires`: one row per replica, however many
        batches it owns."""
        await self._exec(
            "INSERT INTO replicas(id, started_at, lease_expires) VALUES (?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET lease_expires=excluded.lease_expires", (replica, now, expires))

    async def owned_batches(self, replica: str) -> dict[str, int]:
        """The unfinished batches `replica` owns: id -> revision."""
        rows = await self.readers.fetchall(
            f"SELECT id, revision FROM batches WHERE owner=? AND {_ACTIVE}", (replica,))
        return {r[0]: r[1] for r in rows}

    async def adopt_batches(self, replica: str, now: float, limit: int, *,
                            own: bool = False) -> list[BatchRecord]:
        """Make `replica` the owner of up to `limit` unfinished batches nobody holds a live lease
        on (no owner, or an owner whose lease expired before `now`), oldest first; `own`: its own
        batches too (a replica restarting on its data directory takes them straight back). The
        compare-and-set runs in one BEGIN IMMEDIATE transaction: two replicas adopting at once
        never get the same batch."""
        condition = ("(b.owner IS NULL OR r.lease_expires IS NULL OR r.lease_expires < ?"
                     + (" OR b.owner = ?)" if own else ")"))
        args: tuple = (now, replica) if own else (now,)
        async with self._writing():
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                async with self.db.execute(
                        f"SELECT b.id, b.doc FROM batches b LEFT JOIN replicas r ON r.id = b.owner"
                        f" WHERE b.{_ACTIVE} AND {condition} ORDER BY b.created_at LIMIT ?",
                        (*args, limit)) as cur:
                    rows = await cur.fetchall()
                await self.db.executemany("UPDATE batches SET owner=? WHERE id=?", [(replica, r[0]) for r in rows])
                await self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise
        return [batch_from_doc(r[1]) for r in rows]

    async def release_batches(self, replica: str) -> None:
        """`replica` stops (gracefully): its batches are free for the others at once."""
        async with self._writing():
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.execute("UPDATE batches SET owner=NULL WHERE owner=?", (replica,))
                await self.db.execute("DELETE FROM replicas WHERE id=?", (replica,))
                await self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise

    async def batch_revisions(self, batch_ids: Sequence[str]) -> dict[str, int]:
        """The current revision of each of `batch_ids` that exists."""
        if not batch_ids:
            return {}
        rows = await self.readers.fetchall(
            f"SELECT id, revision FROM batches WHERE id IN ({','.join('?' * len(batch_ids))})", list(batch_ids))
        return {r[0]: r[1] for r in rows}

    # -- executor results (providers/executor/progress.py) ---------------------------------

    async def append_results(self, batch_id: str, seq: int, writer: str, output: bytes, errors: bytes, *,
                             owner: str) -> None:
        """Segment `seq` of a batch's executor results (whole JSONL lines), by the run `writer`,
        stored only while `owner` owns the batch (LeaseLost otherwise). Duplicate when segment
        `seq` exists already."""
        async with self._writing():
            cur = await self.db.execute(
                "INSERT INTO executor_results(batch_id, seq, writer, output, errors)"
                " SELECT ?,?,?,?,? WHERE EXISTS (SELECT 1 FROM batches WHERE id=? AND owner=?)",
                (batch_id, seq, writer, output, errors, batch_id, owner))
        if cur.rowcount != 1:
            raise LeaseLost(batch_id)

    async def read_results(self, batch_id: str) -> list[tuple[str, bytes, bytes]]:
        """Every stored segment of `batch_id`, in order: (writer, output lines, error lines)."""
        rows = await self.readers.fetchall(
            "SELECT writer, output, errors FROM executor_results WHERE batch_id=? ORDER BY seq", (batch_id,))
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    async def delete_results(self, batch_id: str) -> None:
        await self._exec("DELETE FROM executor_results WHERE batch_id=?", (batch_id,))
