"""The storage ports core depends on; implementations live beside them (SQLite or PostgreSQL for
metadata, local disk, S3 or GCS for blobs: `store/sqlite/`, `store/blobs/`, …) and app.py is the
only place that picks one (through `store/urls.py`).

Every method may raise the neutral errors of `store.errors` (StorageFull, StorageUnavailable,
Duplicate, RevisionConflict, StorageError) and nothing backend-specific: no `sqlite3`, `OSError`,
asyncpg, botocore or google.api_core exception crosses into core/. Each implementation passes the
contract suites in tests/contract/.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchgate_server.domain.models import ApiKeyRecord, BatchRecord, BatchStatus, FileRecord, ProjectQuota
from batchgate_server.domain.webhooks import OutboxEvent, WebhookEndpoint

DEFAULT_READ_CHUNK = 256 * 1024
# Blocks in which `BlobStore.lines` reads a blob.
LINE_READ_BLOCK = 1024 * 1024


class BlobWriter(abc.ABC):
    """One new blob being written. Nothing is visible under any key until `commit`; a writer that
    is aborted, or never committed (the process died), leaves no object behind that a reader or
    `keys()` would see (implementations clean up their staging: temp files, multipart uploads,
    resumable sessions)."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Append `data`. Implementations buffer at most one part (e.g. an S3 multipart part) in
        memory: memory stays flat whatever the blob's size. Each call may cost a thread hop or a
        network call, so callers write blocks (kilobytes to a few MiB), not lines. Writes of one
        writer are sequential: await one before the next. StorageFull aborts the writer."""

    @abc.abstractmethod
    async def commit(self, key: str) -> int:
        """Make the written bytes visible under `key` atomically (all or nothing) and durably;
        returns the size. Committing over an existing key replaces it (a finalisation redone after
        a crash rewrites the same ids)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything written. Safe to call more than once, and after commit (then a no-op)."""


class BlobStore(abc.ABC):
    """Immutable blobs by key. Keys are opaque ids such as `file-…` (no `/`, no leading `.`): any
    other key is a ValueError."""

    @abc.abstractmethod
    def open_writer(self) -> BlobWriter:
        """A writer for a new blob (cheap: no I/O happens until the first write)."""

    @abc.abstractmethod
    def read(self, key: str, offset: int = 0, limit: int = 0,
             chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncIterator[bytes]:
        """The bytes of `key` from `offset`, at most `limit` bytes (0: to the end), in chunks of at
        most `chunk_size`. A missing key raises KeyError on the first iteration."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove `key`; False when there was none. Works on a full disk."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """The size of `key`; KeyError when missing."""

    @abc.abstractmethod
    def keys(self) -> AsyncIterator[str]:
        """Every committed key (for housekeeping such as removing blobs without a record). Keys
        of writers not yet committed are never listed."""

    async def close(self) -> None:
        """Release clients and connection pools at shutdown."""

    async def lines(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The non-blank lines of `key` from byte `offset` (a line's start), in order, without
        their newline (nor a trailing `\\r`), read in LINE_READ_BLOCK blocks: how providers read a
        batch's input (ProviderJob.open_input). A missing key raises KeyError on the first iteration."""
        async for run in self._line_runs(key, offset):
            for line in run:
                if line and not line.isspace():  # as line.strip(), without copying the line
                    yield line.rstrip(b"\r")

    async def lines_at(self, key: str, offset: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        """As `lines`, each with the byte offset where it starts in `key` (a shard's start,
        domain/shards.py ShardSelection.byte_offset)."""
        async for at, run in self.line_runs_at(key, offset):
            for item in request_lines_at(at, run):
                yield item

    async def line_runs_at(self, key: str, offset: int = 0) -> AsyncIterator[tuple[int, list[bytes]]]:
        """The raw lines of `key` from `offset` a block's worth at a time, each run with the byte
        offset of its first line: blank lines included, without their newline but with any `\\r`
        (as `lines_at` yields them once stripped), for a reader whose per-line work runs elsewhere
        (the split's, in a thread) rather than a step of the loop per line."""
        at = offset
        async for run in self._line_runs(key, offset):
            yield at, run
            at += sum(map(len, run)) + len(run)

    async def _line_runs(self, key: str, offset: int) -> AsyncIterator[list[bytes]]:
        """The raw lines of `key` from `offset` (blank ones too, without their newline), a block's
        worth at a time: one split per block keeps the per-line cost of a reader to its loop."""
        tail = b""
        async for block in self.read(key, offset=offset, chunk_size=LINE_READ_BLOCK):
            run = (tail + block).split(b"\n")
            tail = run.pop()
            yield run
        if tail:
            yield [tail]


def request_lines_at(at: int, run: Sequence[bytes]) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of `run` (raw lines from byte `at`, as BlobStore.line_runs_at yields
    them), each with its byte offset and without a trailing `\r`: what `lines_at` yields of them."""
    for line in run:
        if line and not line.isspace():  # as line.strip(), without copying the line
            yield at, line.rstrip(b"\r")
        at += len(line) + 1


# -- change feed ------------------------------------------------------------------------

ChangeListener = Callable[[str, int], None]


class ChangeFeed(abc.ABC):
    """Batch changes committed by any replica on this database, as (batch id, revision): a wake-up
    only. A listener reads the batch itself (a notification may be late, coalesced or lost: the
    revision, never a payload, says what is new). PostgreSQL: LISTEN/NOTIFY; SQLite: in-process."""

    @abc.abstractmethod
    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener(batch_id, revision)` on the event loop for every change heard from now
        on; returns the function that unsubscribes. Listeners must not block."""

    @abc.abstractmethod
    def notify(self, batch_id: str, revision: int) -> None:
        """Announce a change this process committed (implementations whose database announces
        commits itself ignore it)."""

    async def close(self) -> None:
        """Stop listening."""


# -- metadata ---------------------------------------------------------------------------


class MetadataStore(abc.ABC):
    """Files, batches, API keys and server secrets of one deployment (every replica shares it).

    Read-your-writes: a read issued after a write has returned sees that write (and every write
    that returned before it), whichever connection serves it; reads only ever see committed data.

    Batches are versioned: every stored change bumps `BatchRecord.revision` by one, compared and
    set in the same atomic write (WatchBatch resumes from revisions). Listings are keyset pages,
    newest first: ordered by (created_at, id) descending, strictly after the cursor `after`.
    `project=None` in a listing means every project (the master key's scope).

    Replicas (core/ownership.py): each unfinished batch has an owner, the replica driving it,
    whose lease on all its batches lasts until its `replicas` row's expiry. `changes` announces
    every committed batch revision to every store on the database.
    """

    changes: ChangeFeed

    def assume_sole_writer(self) -> None:
        """Only this process writes the database (a server on its own data directory, which it has
        locked): a store whose change feed hears every write of this process at once may then
        answer refresh_batch from it, without a read. By default nothing changes."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections (and their threads) at shutdown."""

    # -- server secrets

    @abc.abstractmethod
    async def server_secret(self, name: str) -> bytes:
        """The secret `name` (32 random bytes): the first caller creates it, every later call
        from any server on this database returns the same bytes (concurrent first calls too)."""

    # -- api keys

    @abc.abstractmethod
    async def add_api_key(self, key_hash: str, key: ApiKeyRecord) -> None:
        """Duplicate when key_hash or key.id is taken."""

    @abc.abstractmethod
    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or expired ones included (the caller tells them apart)."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    @abc.abstractmethod
    async def list_api_keys(self, project: str | None, limit: int,
                            after: tuple[float, str] | None) -> list[ApiKeyRecord]:
        """At most `limit` keys of `project` (None: all), revoked ones included, newest first,
        after the keyset cursor (created_at, id)."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, now: float) -> ApiKeyRecord | None:
        """Mark the key revoked at `now` (a key revoked already keeps its first revoked_at);
        returns it as stored, None when there is no such key."""

    @abc.abstractmethod
    async def touch_api_key(self, key_id: str, now: float) -> None:
        """Set last_used_at to `now` (callers throttle this: it is a write)."""

    @abc.abstractmethod
    async def count_api_keys(self) -> int:
        """Unrevoked keys."""

    # -- project quotas

    @abc.abstractmethod
    async def set_project_quota(self, quota: ProjectQuota) -> None:
        """Store `quota` for its project, replacing any earlier one."""

    @abc.abstractmethod
    async def get_project_quota(self, project: str) -> ProjectQuota | None: ...

    @abc.abstractmethod
    async def delete_project_quota(self, project: str) -> bool:
        """False when the project had none."""

    @abc.abstractmethod
    async def stored_bytes(self, project: str) -> int:
        """The sum of the sizes of the project's file records (inputs and outputs)."""

    @abc.abstractmethod
    async def count_unfinished_batches(self, project: str) -> int:
        """The project's batches in a non-terminal status."""

    # -- files

    @abc.abstractmethod
    async def insert_file(self, f: FileRecord, *, max_stored_bytes: int | None = None) -> None:
        """Duplicate when the id is taken, or when the project has a file with the same non-empty
        request_id (request_ids are unique per project; an empty one is no request_id).
        `max_stored_bytes`: the project's limit, checked in the insert's own transaction (atomic
        with it against every other insert, on every replica): QuotaReached when the project's
        files would pass it with this one."""

    @abc.abstractmethod
    async def get_file(self, file_id: str) -> FileRecord | None: ...

    @abc.abstractmethod
    async def get_file_by_request_id(self, project: str, request_id: str) -> FileRecord | None: ...

    @abc.abstractmethod
    async def list_files(self, project: str | None, purpose: str | None, limit: int,
                         after: tuple[float, str] | None, oldest_first: bool = False) -> list[FileRecord]:
        """At most `limit` files of `project` (None: all), of `purpose` (a FilePurpose value;
        None: any), newest first (or oldest first), after the keyset cursor (created_at, id).
        Shards' result files (merged_into set) are never listed."""

    @abc.abstractmethod
    async def delete_file(self, file_id: str) -> bool:
        """Remove the record; False when there was none. Works on a full disk, so space can
        always be freed."""

    @abc.abstractmethod
    async def expired_files(self, now: float, limit: int = 500) -> list[FileRecord]:
        """At most `limit` files whose expires_at is set and <= now."""

    @abc.abstractmethod
    async def all_file_ids(self) -> set[str]: ...

    @abc.abstractmethod
    async def shard_result_files(self, limit: int = 500) -> list[FileRecord]:
        """At most `limit` shards' result files (merged_into set), in no particular order."""

    # -- batches

    @abc.abstractmethod
    async def insert_batch(self, b: BatchRecord, *, owner: str | None = None,
                           max_unfinished: int | None = None) -> None:
        """Stores `b` at its revision as given, owned by the replica `owner`. Duplicate when the
        id is taken, or when the project has a batch with the same non-empty request_id.
        `max_unfinished`: the project's limit of unfinished batches, checked in the insert's own
        transaction (atomic with it, on every replica): QuotaReached when it has that many."""

    @abc.abstractmethod
    async def get_batch(self, batch_id: str) -> BatchRecord | None: ...

    @abc.abstractmethod
    async def refresh_batch(self, known: BatchRecord) -> BatchRecord | None:
        """get_batch of `known.id`, except that it returns `known` itself while the stored revision is
        still `known.revision` (the document is then neither transferred nor decoded: a poller's
        read of an unchanged batch). None when the batch is gone."""

    @abc.abstractmethod
    async def get_batch_by_request_id(self, project: str, request_id: str) -> BatchRecord | None: ...

    @abc.abstractmethod
    async def list_batches(self, project: str | None, statuses: Sequence[BatchStatus], limit: int,
                           after: tuple[float, str] | None) -> list[BatchRecord]:
        """At most `limit` batches of `project` (None: all) whose status is one of `statuses`
        (empty: any), newest first, after the keyset cursor (created_at, id)."""

    @abc.abstractmethod
    async def active_batch_reading(self, file_id: str) -> str | None:
        """The id of an unfinished (non-terminal) batch whose input is `file_id`, if any."""

    @abc.abstractmethod
    async def active_batches(self) -> list[BatchRecord]:
        """Every unfinished batch, oldest first (created_at ascending)."""

    @abc.abstractmethod
    async def update_batch(self, b: BatchRecord, *, extra_files: Sequence[FileRecord] = (),
                           ledger: dict[str, Any] | None = None, outbox: Sequence[OutboxEvent] = (),
                           owner: str | None = None) -> BatchRecord:
        """Persist `b` as revision b.revision + 1, its result files `extra_files`, its usage
        ledger row `ledger` and its webhook events `outbox` in one atomic transaction, and return
        `b` with the new revision. An outbox event already stored under its key is kept as it is.

        Compare-and-set: RevisionConflict (and nothing written, b.revision unchanged) when the
        stored revision is not b.revision. A file of `extra_files` already recorded under its id
        is kept as it is (a redone finalisation). The ledger row (the columns of
        `UsageLedger`, see core/accounting.py ledger_row) is keyed by its batch_id and written
        at most once, ever: a second row for the same batch is ignored, not an error. On any
        error nothing is written and b.revision is what it was.

        `owner`: write only while that replica owns the batch, LeaseLost otherwise (a replica
        that lost its lease never writes over the one that adopted the batch). None: whoever
        owns it (a cancel stored by another replica)."""

    @abc.abstractmethod
    async def split_batch(self, parent: BatchRecord, shards: Sequence[BatchRecord], *, owner: str) -> BatchRecord:
        """One transaction: insert `shards` (owned by `owner`) and persist `parent` as revision
        parent.revision + 1, fenced as update_batch with `owner` (RevisionConflict / LeaseLost,
        nothing written). Returns `parent` with its new revision (domain/shards.py step 2)."""

    # -- replicas and leases

    @abc.abstractmethod
    async def renew_lease(self, replica: str, now: float, expires: float) -> None:
        """Extend every lease of `replica` to `expires` (one row per replica, however many
        batches it owns); registers the replica on first use."""

    @abc.abstractmethod
    async def owned_batches(self, replica: str) -> dict[str, int]:
        """The unfinished batches `replica` owns: id -> revision."""

    @abc.abstractmethod
    async def adopt_batches(self, replica: str, now: float, limit: int, *, own: bool = False) -> list[BatchRecord]:
        """Make `replica` the owner of up to `limit` unfinished batches nobody holds a live lease
        on (no owner, or an owner whose lease expired before `now`), oldest first; `own`: its own
        too. Atomic per batch: replicas adopting at once never get the same batch."""

    @abc.abstractmethod
    async def release_batches(self, replica: str) -> None:
        """`replica` stops gracefully: its batches have no owner from now on, its lease is gone."""

    @abc.abstractmethod
    async def batch_revisions(self, batch_ids: Sequence[str]) -> dict[str, int]:
        """The current revision of each of `batch_ids` that exists."""

    # -- executor answers (providers/executor/progress.py)

    @abc.abstractmethod
    async def append_results(self, batch_id: str, seq: int, writer: str, output: bytes, errors: bytes, *,
                             owner: str) -> None:
        """Store segment `seq` of a batch's executor answers (whole JSONL lines of the output and
        the error file) by the run `writer`, only while `owner` owns the batch (LeaseLost
        otherwise). Duplicate when segment `seq` exists."""

    @abc.abstractmethod
    async def read_results(self, batch_id: str) -> list[tuple[str, bytes, bytes]]:
        """Every segment of `batch_id` in order: (writer, output lines, error lines)."""

    @abc.abstractmethod
    async def delete_results(self, batch_id: str) -> None: ...

    # -- webhooks

    @abc.abstractmethod
    async def add_webhook_endpoint(self, e: WebhookEndpoint) -> None:
        """Duplicate when the id is taken."""

    @abc.abstractmethod
    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None: ...

    @abc.abstractmethod
    async def list_webhook_endpoints(self, project: str | None) -> list[WebhookEndpoint]:
        """The endpoints of `project` (None: all), oldest first."""

    @abc.abstractmethod
    async def delete_webhook_endpoint(self, endpoint_id: str) -> bool:
        """False when there was none. Its undelivered events stay (the deliverer drops them)."""

    @abc.abstractmethod
    async def claim_outbox(self, owner: str, now: float, lease: float, limit: int) -> list[OutboxEvent]:
        """Claim at most `limit` due events (neither delivered nor given up, next_attempt_at <=
        now, unclaimed or their claim expired) for `owner` until now + lease, atomically: two
        concurrent claims (from any replica) never return the same event while its lease runs.
        Oldest first."""

    @abc.abstractmethod
    async def outbox_delivered(self, event_id: str, endpoint_id: str, now: float) -> None:
        """Record a delivery (whoever holds the claim: the event did arrive)."""

    @abc.abstractmethod
    async def outbox_failed(self, event_id: str, endpoint_id: str, owner: str, error: str,
                            retry_at: float | None, now: float) -> None:
        """Record a failed attempt by `owner` and release its claim: due again at `retry_at`, or
        given up (None). Ignored when `owner` no longer holds the claim or it was delivered."""

    @abc.abstractmethod
    async def outbox_events(self, batch_id: str) -> list[OutboxEvent]:
        """Every event of `batch_id` whatever its state (for operators and tests)."""


# -- usage ledger ------------------------------------------------------------------------

# Group dimensions: ledger column -> name in UsageGroup.group.
LEDGER_COLUMNS = {"project": "project", "api_key_id": "api_key_id", "model": "model", "provider": "provider"}
METADATA = "metadata"


@dataclass(frozen=True)
class Dimension:
    """One grouping dimension: a ledger column ("project", "api_key_id", "model", "provider")
    or "metadata" with the metadata key whose value groups."""

    kind: str
    metadata_key: str = ""

    @property
    def name(self) -> str:
        return f"metadata.{self.metadata_key}" if self.kind == METADATA else LEDGER_COLUMNS[self.kind]


@dataclass(frozen=True)
class LedgerFilter:
    start: float | None = None  # ended_at >= start
    end: float | None = None  # ended_at < end
    project: str | None = None  # None: every project
    model: str = ""
    provider: str = ""
    as_of: int | None = None  # only rows up to this UsageLedger.high_water() mark


@dataclass
class UsageGroup:
    group: dict[str, str] = field(default_factory=dict)
    batch_count: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0  # sum of the known costs, in 1e-9 USD
    unknown_cost: int = 0  # batches whose cost is unknown (not in cost_nanos)
    cache_creation_tokens: int = 0  # prompt-cache writes (part of input_tokens)
    cache_creation_1h_tokens: int = 0  # the 1-hour ones among them
    # The keyset cursor of this group (JSON-serialisable), for the next page.
    sort_key: list[Any] = field(default_factory=list)


class UsageLedger(abc.ABC):
    """Aggregate queries over the usage ledger: one row per ended batch, written by
    MetadataStore.update_batch together with the batch's end, insert-only.

    Sums are exact: tokens as integers and known costs as integer nano-dollars (`cost_nanos`). A
    row whose cost is not known (cost_status not "known", or cost_nanos NULL) is counted in
    `unknown_cost`, never added as zero. Reads see every row committed before them.
    """

    @abc.abstractmethod
    async def high_water(self) -> int:
        """A mark (0 on an empty ledger) that grows with every row inserted: `LedgerFilter.as_of`
        pins every page of a multi-page query to the rows that existed at its first page."""

    @abc.abstractmethod
    async def totals(self, f: LedgerFilter) -> UsageGroup:
        """The sums over every row matching `f` (a group with batch_count 0 when none)."""

    @abc.abstractmethod
    async def aggregate(self, f: LedgerFilter, dims: Sequence[Dimension], limit: int,
                        after: Sequence[Any] | None = None) -> list[UsageGroup]:
        """Groups of the rows matching `f`, by the values of `dims`, in ascending order of those
        values (for a metadata dimension: the group without that key first, then by value), at
        most `limit`, after the cursor `after` (a previous group's sort_key). A group's `group`
        names only the dimensions it has a value for. Without dims: the one group of everything
        (none if the ledger has no matching row, or when `after` is given)."""
