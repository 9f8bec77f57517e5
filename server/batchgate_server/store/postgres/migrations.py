"""The PostgreSQL schema, versioned: an append-only list of scripts, applied at start-up by one
server at a time (a session advisory lock), each in its own transaction with its row in
`schema_migrations`.

Replicas starting together on an empty database queue on the lock: the first creates the schema,
the others find it at the latest version and apply nothing. A server killed while migrating loses
its connection, so the lock is released and its open migration rolled back (PostgreSQL's DDL is
transactional): the next start applies it again.

Differences from the SQLite schema, all kept inside store/postgres:
- Identifiers and grouped text are `COLLATE "C"`: byte order, as SQLite's, whatever the
  database's locale, so listings and usage pages come in the same order on both.
- PostgreSQL's text cannot hold U+0000, which the API accepts in request ids, metadata and the
  model of an uploaded file: those are stored as UTF-8 `bytea` (the same byte order). The batch
  document is JSON text (json.dumps escapes every control character).
- The ledger's metadata is a side table of (batch, key, value) rows, so usage groups by a key
  with an exact match (no JSON-path quoting) and the same byte order.
- `usage_ledger.seq` (an identity) stands for SQLite's rowid: rows get it under the LEDGER lock,
  so a higher seq never commits before a lower one (see UsageLedger.high_water).
"""

from __future__ import annotations

import contextlib
import logging
import time

import asyncpg

from batchgate_server.store.postgres import locks

log = logging.getLogger(__name__)

# The statuses of an ended batch, as literals: partial indexes need them in the statement, not as
# parameters. (domain/models.py TERMINAL_STATUSES; a new terminal status needs a new migration.)
TERMINAL = "('failed', 'completed', 'expired', 'cancelled')"

# Each entry migrates from version i to i+1. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE files (
        id TEXT COLLATE "C" PRIMARY KEY,
        project TEXT COLLATE "C" NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        line_count BIGINT NOT NULL DEFAULT 0,
        endpoint TEXT NOT NULL DEFAULT '',
        model BYTEA NOT NULL DEFAULT '',
        request_id BYTEA
    );
    CREATE UNIQUE INDEX files_request_id ON files(project, request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX files_project_created ON files(project, created_at DESC, id DESC);
    CREATE INDEX files_created ON files(created_at DESC, id DESC);
    CREATE INDEX files_expires ON files(expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        project TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );

    CREATE TABLE batches (
        id TEXT COLLATE "C" PRIMARY KEY,
        project TEXT COLLATE "C" NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        request_id BYTEA,
        input_file_id TEXT COLLATE "C" NOT NULL,
        revision BIGINT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE UNIQUE INDEX batches_request_id ON batches(project, request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX batches_project_created ON batches(project, created_at DESC, id DESC);
    CREATE INDEX batches_created ON batches(created_at DESC, id DESC);
    CREATE INDEX batches_active ON batches(created_at) WHERE status NOT IN {TERMINAL};
    CREATE INDEX batches_active_input ON batches(input_file_id) WHERE status NOT IN {TERMINAL};

    CREATE TABLE usage_ledger (
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        batch_id TEXT COLLATE "C" PRIMARY KEY,
        project TEXT COLLATE "C" NOT NULL,
        api_key_id TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        provider TEXT COLLATE "C" NOT NULL,
        deployment_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION NOT NULL,
        input_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL,
        cost_status TEXT NOT NULL,
        cost_amount TEXT NOT NULL,
        cost_nanos NUMERIC,
        metadata TEXT NOT NULL,
        usage_by_model TEXT NOT NULL
    );
    CREATE INDEX usage_ledger_ended ON usage_ledger(ended_at);
    CREATE INDEX usage_ledger_project ON usage_ledger(project, ended_at);
    CREATE TABLE usage_ledger_metadata (
        batch_id TEXT COLLATE "C" NOT NULL REFERENCES usage_ledger(batch_id),
        key BYTEA NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (batch_id, key)
    );

    CREATE TABLE server_secrets (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )
    """,
    # Named, expiring keys with a last-use time; per-project quotas set through AdminService.
    # files_project_bytes lets SUM(bytes) per project (stored_bytes) read the index only;
    # batches_active_project counts a project's unfinished batches (count_unfinished_batches).
    f"""
    ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT '';
    ALTER TABLE api_keys ADD COLUMN expires_at DOUBLE PRECISION;
    ALTER TABLE api_keys ADD COLUMN last_used_at DOUBLE PRECISION;
    CREATE INDEX api_keys_created ON api_keys(created_at DESC, key_id DESC);
    CREATE INDEX api_keys_project_created ON api_keys(project, created_at DESC, key_id DESC);
    CREATE TABLE project_quotas (
        project TEXT COLLATE "C" PRIMARY KEY,
        max_running_batches BIGINT,
        max_stored_bytes BIGINT,
        max_uploads BIGINT,
        monthly_budget_nanos BIGINT
    );
    CREATE INDEX files_project_bytes ON files(project) INCLUDE (bytes);
    CREATE INDEX batches_active_project ON batches(project) WHERE status NOT IN {TERMINAL}
    """,
    # Webhook endpoints added through WebhookService, and the outbox: one row per event and
    # endpoint, written in the batch's terminal transaction and claimed by a deliverer (claimed_by
    # until claimed_until; FOR UPDATE SKIP LOCKED) so two replicas do not send it at once.
    """
    CREATE TABLE webhook_endpoints (
        id TEXT COLLATE "C" PRIMARY KEY,
        project TEXT COLLATE "C" NOT NULL,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX webhook_endpoints_project ON webhook_endpoints(project, created_at);
    CREATE TABLE webhook_outbox (
        event_id TEXT COLLATE "C" NOT NULL,
        endpoint_id TEXT COLLATE "C" NOT NULL,
        project TEXT COLLATE "C" NOT NULL,
        batch_id TEXT COLLATE "C" NOT NULL,
        event_type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        claimed_by TEXT,
        claimed_until DOUBLE PRECISION,
        delivered_at DOUBLE PRECISION,
        given_up_at DOUBLE PRECISION,
        last_error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (event_id, endpoint_id)
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox(next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    CREATE INDEX webhook_outbox_batch ON webhook_outbox(batch_id)
    """,
    # Replicas (store/postgres/leases.py): each unfinished batch's owner and every replica's lease;
    # the executor's answer segments; a NOTIFY for every committed batch revision.
    f"""
    CREATE TABLE replicas (
        id TEXT COLLATE "C" PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        lease_expires DOUBLE PRECISION NOT NULL
    );
    ALTER TABLE batches ADD COLUMN owner TEXT COLLATE "C";
    CREATE INDEX batches_active_owner ON batches(owner) WHERE status NOT IN {TERMINAL};
    CREATE TABLE executor_results (
        batch_id TEXT COLLATE "C" NOT NULL,
        seq INTEGER NOT NULL,
        writer TEXT NOT NULL,
        output BYTEA NOT NULL,
        errors BYTEA NOT NULL,
        PRIMARY KEY (batch_id, seq)
    );
    CREATE FUNCTION batchgate_batch_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('batchgate_batches', NEW.id || ' ' || NEW.revision);
        RETURN NULL;
    END $$;
    CREATE TRIGGER batches_changed AFTER UPDATE ON batches FOR EACH ROW
        WHEN (OLD.revision IS DISTINCT FROM NEW.revision) EXECUTE FUNCTION batchgate_batch_changed()
    """,
    # A batch file's lines by (url, body.model), JSON (store/codec.py groups_to_json; ASCII, so
    # TEXT holds any model name). NULL on files stored before: one group, the row's own.
    """
    ALTER TABLE files ADD COLUMN line_groups TEXT
    """,
    # Sharded batches (domain/shards.py): a shard's row names its parent, so listings and quotas
    # see parents only; a shard's ledger row names the parent too, so usage counts the batch once.
    """
    ALTER TABLE batches ADD COLUMN parent_id TEXT COLLATE "C";
    CREATE INDEX batches_parent ON batches(parent_id) WHERE parent_id IS NOT NULL;
    ALTER TABLE usage_ledger ADD COLUMN parent_batch_id TEXT COLLATE "C"
    """,
    # Prompt-cache writes (parts of input_tokens; the 1-hour ones a part of those): QueryUsage sums them.
    """
    ALTER TABLE usage_ledger ADD COLUMN cache_creation_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_ledger ADD COLUMN cache_creation_1h_tokens BIGINT NOT NULL DEFAULT 0
    """,
    # A shard's result files name the parent that merges them (FileRecord.merged_into): callers'
    # listings and stored bytes leave them out (the partial index still covers SUM(bytes)), and
    # the sweep finds those whose parent has ended.
    """
    ALTER TABLE files ADD COLUMN merged_into TEXT COLLATE "C";
    DROP INDEX files_project_bytes;
    CREATE INDEX files_project_bytes ON files(project) INCLUDE (bytes) WHERE merged_into IS NULL;
    CREATE INDEX files_merged_into ON files(merged_into) WHERE merged_into IS NOT NULL
    """,
]
_VERSIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)
"""


async def schema_version(conn: asyncpg.Connection) -> int:
    """The latest applied migration; 0 on an empty database."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def migrate(conn: asyncpg.Connection) -> None:
    """Apply the pending migrations, holding the MIGRATIONS lock (waiting for it while another
    server migrates). Refuses a database newer than this server."""
    await conn.execute("SELECT pg_advisory_lock($1, $2)", locks.NAMESPACE, locks.MIGRATIONS)
    try:
        await conn.execute(_VERSIONS)
        version = await schema_version(conn)
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this server ({len(MIGRATIONS)})")
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            log.info("migrating the PostgreSQL schema to version %d", target)
            async with conn.transaction():
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_migrations(version, applied_at) VALUES ($1, $2)",
                                   target, time.time())
    finally:
        # A broken connection has released the lock with itself.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", locks.NAMESPACE, locks.MIGRATIONS)
