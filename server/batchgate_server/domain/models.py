"""Domain types shared by every layer. Plain dataclasses: no proto, no SQL."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from batchgate_server.domain.shards import FileGroup, PlannedPart, ShardSelection


class BatchStatus(str, enum.Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class FilePurpose(str, enum.Enum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


@dataclass
class FileRecord:
    id: str
    project: str
    filename: str
    purpose: FilePurpose
    bytes: int
    sha256: str
    created_at: float
    expires_at: float | None = None
    line_count: int = 0
    endpoint: str = ""
    model: str = ""
    request_id: str = ""
    # Its lines by (endpoint, body.model), counted at upload; empty on files stored before
    # groups were kept (then endpoint, model and line_count above are the one group).
    groups: list[FileGroup] = field(default_factory=list)
    # A shard's result file (issue 14): the parent batch whose merge reads it. Internal: hidden
    # from the caller's files and stored-bytes quota, deleted once that parent has ended.
    merged_into: str = ""


@dataclass
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class BatchError:
    code: str
    message: str
    param: str = ""
    line: int | None = None


@dataclass
class FailureCount:
    """Requests of a running batch that failed with one error code (the live failure summary)."""

    code: str  # an error line's error.code, or "http_<status>" for an HTTP error answer
    count: int = 0  # requests answered with this error (lines of the error file)
    retried: int = 0  # failed attempts with this code that were retried
    sample_message: str = ""  # one of their messages, shortened


@dataclass
class Usage:
    """Token counts in OpenAI's sense: cached_tokens (prompt-cache reads) and cache_creation_tokens
    (prompt-cache writes, Anthropic's cache_creation_input_tokens) are parts of input_tokens;
    cache_creation_1h_tokens is the part of the writes with a 1-hour lifetime (the rest are
    5-minute writes); reasoning_tokens is a part of output_tokens."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_creation_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: "Usage") -> None:
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cache_creation_tokens += other.cache_creation_tokens
        self.cache_creation_1h_tokens += other.cache_creation_1h_tokens


@dataclass
class Cost:
    """What a batch cost. status: pending | known | unknown. Amounts are exact decimal strings."""

    status: str = "pending"
    currency: str = "USD"
    amount: str = ""
    input_amount: str = ""
    output_amount: str = ""
    reason: str = ""
    price_source: str = ""


# Timestamps a status transition stamps, by the status entered.
STATUS_TIMESTAMP = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLING: "cancelling_at",
    BatchStatus.CANCELLED: "cancelled_at",
}


@dataclass
class ShardSummary:
    """A shard as its parent shows it (Batch.shards), kept current by the parent's runner."""

    id: str
    endpoint: str
    model: str  # the model name routed by
    provider: str
    deployment_id: str
    provider_job_id: str = ""
    status: BatchStatus = BatchStatus.VALIDATING
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    errors: list[BatchError] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)


@dataclass
class BatchRecord:
    id: str
    project: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: float
    expires_at: float
    model: str = ""
    provider: str = ""
    deployment_id: str = ""
    input_line_count: int = 0
    api_key_id: str = ""
    request_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    errors: list[BatchError] = field(default_factory=list)
    # While it runs (built-in executor): why requests fail, by error code, few and short.
    failures: list[FailureCount] = field(default_factory=list)
    usage: Usage | None = None
    cost: Cost = field(default_factory=Cost)
    output_file_id: str = ""
    error_file_id: str = ""
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    revision: int = 1
    # Opaque, JSON-serialisable state owned by the provider adapter (job ids,
    # remapped custom_ids, ...). Persisted with every change.
    provider_state: dict[str, Any] = field(default_factory=dict)
    # Ids the result files will get, chosen once so a finalisation redone after a
    # crash writes the same files instead of new ones.
    result_file_ids: list[str] = field(default_factory=list)
    # The price in force when the batch was created (pricing.table snapshot), or None.
    price: dict[str, Any] | None = None
    # What CreateBatch asked for (model and provider above are what routing chose), compared when
    # its request_id is used again. None on batches created before they were kept.
    requested_model: str | None = None
    requested_provider: str | None = None
    # Sharding (domain/shards.py). On a shard: its parent's id and the lines it runs.
    parent_id: str = ""
    selection: ShardSelection | None = None
    # On a sharded parent: the routing decided at CreateBatch (non-empty means sharded), then,
    # once split, its shards as it shows them. What CreateBatch asked for besides model/provider.
    plan: list[PlannedPart] = field(default_factory=list)
    shards: list[ShardSummary] = field(default_factory=list)
    requested_model_map: dict[str, str] | None = None
    requested_spread: bool | None = None

    @property
    def sharded(self) -> bool:
        return bool(self.plan)


@dataclass
class ApiKeyRecord:
    """A project API key as stored: its hash, never its secret."""

    id: str  # "key_…": safe to show, log and record on batches
    project: str
    created_at: float
    name: str = ""
    expires_at: float | None = None  # None: never expires
    revoked_at: float | None = None
    last_used_at: float | None = None  # updated at most once a minute (core/auth.py)


@dataclass
class ProjectQuota:
    """Per-project limits; None means no limit of that kind (the upload cap then falls back to
    --max-uploads-per-project)."""

    project: str
    max_running_batches: int | None = None
    max_stored_bytes: int | None = None
    max_uploads: int | None = None
    monthly_budget_nanos: int | None = None  # USD, in 1e-9 units like the ledger's cost_nanos
