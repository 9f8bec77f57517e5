"""The usage query: spend over a time range, grouped, paginated, scoped to the caller.

A project key sees only its own project: its scope is forced into the query, and a
`project` filter naming another project simply matches nothing (no error, so it does not
tell whether that project exists). The master key sees every project.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from batchgate_server.core import pagination
from batchgate_server.core.auth import Principal
from batchgate_server.core.errors import FieldViolation, InvalidArgument
from batchgate_server.pricing.cost import nanos_to_amount
from batchgate_server.store.ports import Dimension, LedgerFilter, UsageGroup, UsageLedger

CURRENCY = "USD"
MAX_METADATA_KEY = 64  # as for batch metadata keys


class GroupBy(str, enum.Enum):
    PROJECT = "project"
    API_KEY = "api_key_id"
    MODEL = "model"
    PROVIDER = "provider"
    METADATA_KEY = "metadata"


@dataclass
class UsageQuery:
    start: float | None = None  # ended_at >= start (unix seconds)
    end: float | None = None  # ended_at < end
    group_by: list[GroupBy] = field(default_factory=list)
    metadata_key: str = ""
    project: str = ""
    model: str = ""
    provider: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass
class UsageSums:
    group: dict[str, str]
    batch_count: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_amount: str  # exact decimal sum of the known costs
    unknown_cost_batches: int
    currency: str = CURRENCY
    cache_creation_tokens: int = 0
    cache_creation_1h_tokens: int = 0


@dataclass
class UsageReport:
    rows: list[UsageSums]
    next_page_token: str
    totals: UsageSums


def _invalid(message: str, reason: str, field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument(message, reason, {}, [FieldViolation(field_name, description)])


def check_query(q: UsageQuery) -> None:
    if q.start is not None and q.end is not None and q.end <= q.start:
        raise _invalid("end_time must be after start_time", "INVALID_TIME_RANGE", "end_time",
                       "must be after start_time")
    seen: set[GroupBy] = set()
    for g in q.group_by:
        if g in seen:
            raise _invalid(f"group_by lists {g.name} twice", "DUPLICATE_GROUP_BY", "group_by",
                           "each dimension at most once")
        seen.add(g)
    if GroupBy.METADATA_KEY in seen:
        if not q.metadata_key:
            raise _invalid("grouping by USAGE_GROUP_BY_METADATA_KEY needs metadata_key", "MISSING_METADATA_KEY",
                           "metadata_key", "required with USAGE_GROUP_BY_METADATA_KEY")
        if len(q.metadata_key) > MAX_METADATA_KEY:
            raise _invalid(f"metadata_key is longer than {MAX_METADATA_KEY} characters", "INVALID_METADATA_KEY",
                           "metadata_key", f"1 to {MAX_METADATA_KEY} characters")
    elif q.metadata_key:
        raise _invalid("metadata_key is only used with USAGE_GROUP_BY_METADATA_KEY", "UNUSED_METADATA_KEY",
                       "metadata_key", "set only when group_by has USAGE_GROUP_BY_METADATA_KEY")


def _sums(g: UsageGroup) -> UsageSums:
    return UsageSums(group=dict(g.group), batch_count=g.batch_count, input_tokens=g.input_tokens,
                     cached_tokens=g.cached_tokens, output_tokens=g.output_tokens,
                     reasoning_tokens=g.reasoning_tokens, cost_amount=nanos_to_amount(g.cost_nanos),
                     unknown_cost_batches=g.unknown_cost, cache_creation_tokens=g.cache_creation_tokens,
                     cache_creation_1h_tokens=g.cache_creation_1h_tokens)


def _cursor(raw: object, width: int) -> tuple[int, list | None]:
    """(as_of, sort key) from a decoded page token; a token whose shape is wrong is malformed."""
    ok = (isinstance(raw, dict) and type(raw.get("a")) is int and raw["a"] >= 0
          and isinstance(raw.get("s"), list) and len(raw["s"]) == width
          and all(type(v) in (str, int) for v in raw["s"]))
    if not ok:
        raise pagination.invalid_token("malformed")
    return raw["a"], (raw["s"] or None)


class UsageReporter:
    def __init__(self, ledger: UsageLedger, page_tokens: pagination.PageTokens) -> None:
        self.ledger = ledger
        self.page_tokens = page_tokens

    async def query(self, principal: Principal, q: UsageQuery, weigh: Callable[[UsageSums], int]) -> UsageReport:
        """A page of groups: at most q.page_size, and fewer when they would weigh more than
        MAX_PAGE_BYTES in the response (`weigh`: a row's serialized size)."""
        check_query(q)
        limit = pagination.page_size(q.page_size)
        dims = [Dimension(g.value, q.metadata_key if g is GroupBy.METADATA_KEY else "") for g in q.group_by]
        # Everything that decides the result set, the caller's scope included, binds the token.
        filter_key = json.dumps(["usage", principal.scope, q.start, q.end, [d.name for d in dims], q.project, q.model,
                                 q.provider])
        width = sum(2 if d.kind == "metadata" else 1 for d in dims)
        raw = self.page_tokens.open(q.page_token, filter_key)
        as_of, after = _cursor(raw, width) if raw is not None else (await self.ledger.high_water(), None)

        project: str | None = principal.scope  # None: every project (the master key)
        if q.project:
            if project is not None and q.project != project:
                empty = UsageGroup()
                return UsageReport([], "", _sums(empty))  # another project's spend is not visible
            project = q.project
        f = LedgerFilter(start=q.start, end=q.end, project=project, model=q.model, provider=q.provider,
                         as_of=as_of)
        groups = await self.ledger.aggregate(f, dims, limit + 1, after)
        rows = [_sums(g) for g in groups[:limit]]
        kept, _ = pagination.fitting(rows, weigh, pagination.MAX_PAGE_BYTES, at_least_one=True)
        next_token = ""
        if len(groups) > kept:
            rows = rows[:kept]
            next_token = self.page_tokens.seal({"a": as_of, "s": groups[kept - 1].sort_key}, filter_key)
        totals = await self.ledger.totals(f)
        return UsageReport(rows, next_token, _sums(totals))
