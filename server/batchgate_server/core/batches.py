"""The Batch use cases: create (validate, route, hand to the tracker), get, list, cancel, watch."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from batchgate_server.core.accounting import Accounting
from batchgate_server.core.auth import Principal
from batchgate_server.core.errors import invalid_field as _invalid
from batchgate_server.core.errors import (
    FailedPrecondition,
    echo,
    exhausted_when_full,
    is_utf8_text,
    not_found,
)
from batchgate_server.core.files import FileManager
from batchgate_server.core.jsonl_validation import SUPPORTED_ENDPOINTS
from batchgate_server.core.quotas import Quotas
from batchgate_server.core.pagination import PageTokens, after_cursor, keyset_rows
from batchgate_server.core.routing import Router
from batchgate_server.core.tracker import Tracker, batch_load, cancel_batch
from batchgate_server.core.watch_hub import WatchHub
from batchgate_server.core.shard_plan import BatchPlan, file_groups, plan_batch
from batchgate_server.domain.ids import new_batch_id
from batchgate_server.domain.shards import MAX_FILE_GROUPS
from batchgate_server.domain.models import BatchRecord, BatchStatus, FilePurpose, FileRecord
from batchgate_server.providers.registry import ProviderRegistry
from batchgate_server.store.errors import Duplicate
from batchgate_server.store.ports import MetadataStore

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": 24 * 3600}
# Metadata as OpenAI bounds it: at most 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_REQUEST_ID = 128
# Model names (a model_name, "provider/model", a Bedrock ARN) are far shorter; both are stored.
MAX_MODEL = 256
MAX_PROVIDER = 64
# A file mixes at most MAX_FILE_GROUPS (endpoint, model) groups: as many file models to map.
MAX_MODEL_MAP_PAIRS = MAX_FILE_GROUPS


@dataclass
class CreateBatch:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    model: str = ""
    provider: str = ""
    request_id: str = ""
    # A file model (body.model) -> the name its lines are routed by (core/shard_plan.py).
    model_map: dict[str, str] = field(default_factory=dict)
    spread: bool = False
    # The HTTP API (OpenAI's shape) needs an endpoint unless the file mixes endpoints.
    endpoint_required_unless_mixed: bool = False


def check_create(req: CreateBatch) -> None:
    if not req.input_file_id:
        raise _invalid("input_file_id is required", "MISSING_INPUT_FILE_ID", "input_file_id", "required")
    if req.endpoint and req.endpoint not in SUPPORTED_ENDPOINTS:
        raise _invalid(f"endpoint {echo(req.endpoint)} is not supported; use one of {', '.join(SUPPORTED_ENDPOINTS)}",
                       "UNSUPPORTED_ENDPOINT", "endpoint", f"one of {', '.join(SUPPORTED_ENDPOINTS)}")
    if req.completion_window not in COMPLETION_WINDOWS:
        raise _invalid(f"completion_window {echo(req.completion_window)} is not supported; use \"24h\"",
                       "INVALID_COMPLETION_WINDOW", "completion_window", 'must be "24h"')
    if len(req.metadata) > MAX_METADATA_PAIRS:
        raise _invalid(f"metadata has {len(req.metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed",
                       "INVALID_METADATA", "metadata", f"at most {MAX_METADATA_PAIRS} pairs")
    for key, value in req.metadata.items():
        if not key or len(key) > MAX_METADATA_KEY:
            raise _invalid(f"metadata key {echo(key)} must be 1 to {MAX_METADATA_KEY} characters",
                           "INVALID_METADATA", f"metadata[{key[:80]}]", f"key of 1 to {MAX_METADATA_KEY} characters")
        if len(value) > MAX_METADATA_VALUE:
            raise _invalid(f"metadata value of {key!r} is longer than {MAX_METADATA_VALUE} characters",
                           "INVALID_METADATA", f"metadata[{key}]", f"value of at most {MAX_METADATA_VALUE} characters")
    if len(req.request_id) > MAX_REQUEST_ID:
        raise _invalid("request_id is longer than 128 characters", "INVALID_REQUEST_ID", "request_id",
                       "at most 128 characters")
    if not is_utf8_text(req.request_id):
        raise _invalid("request_id must be UTF-8 text", "INVALID_REQUEST_ID", "request_id", "UTF-8 text")
    if len(req.model) > MAX_MODEL:
        raise _invalid(f"model is longer than {MAX_MODEL} characters", "INVALID_MODEL", "model",
                       f"at most {MAX_MODEL} characters")
    if len(req.provider) > MAX_PROVIDER:
        raise _invalid(f"provider is longer than {MAX_PROVIDER} characters", "INVALID_PROVIDER", "provider",
                       f"at most {MAX_PROVIDER} characters")
    check_model_map(req.model_map)


def check_model_map(model_map: dict[str, str]) -> None:
    if len(model_map) > MAX_MODEL_MAP_PAIRS:
        raise _invalid(f"model_map has {len(model_map)} pairs; at most {MAX_MODEL_MAP_PAIRS} are allowed",
                       "INVALID_MODEL_MAP", "model_map", f"at most {MAX_MODEL_MAP_PAIRS} pairs")
    for key, value in model_map.items():
        for text, what in ((key, "key"), (value, f"value of {echo(key[:80])}")):
            if not 1 <= len(text) <= MAX_MODEL or not is_utf8_text(text):
                raise _invalid(f"model_map {what} must be 1 to {MAX_MODEL} characters of UTF-8 text",
                               "INVALID_MODEL_MAP", f"model_map[{key[:80]}]",
                               f"{what.split()[0]} of 1 to {MAX_MODEL} characters")


def replay(previous: BatchRecord, req: CreateBatch) -> BatchRecord:
    """The batch `req.request_id` created, if `req` asks for the same batch; REQUEST_ID_REUSED
    naming the first parameter that differs otherwise (a key names one request, as in AIP-155)."""
    # An endpoint left out is the file's own (the same file: checked first), as recorded.
    asked = {"input_file_id": req.input_file_id, "endpoint": req.endpoint or previous.endpoint}
    recorded = {"input_file_id": previous.input_file_id, "endpoint": previous.endpoint,
                "completion_window": previous.completion_window, "metadata": previous.metadata,
                "model": previous.requested_model, "provider": previous.requested_provider,
                "model_map": previous.requested_model_map, "spread": previous.requested_spread}
    for name, value in recorded.items():
        if value is not None and asked.get(name, getattr(req, name)) != value:
            raise FailedPrecondition(
                f"request_id {echo(req.request_id)} already created batch {previous.id} with another {name};"
                " use a new request_id for another batch", "REQUEST_ID_REUSED",
                {"request_id": req.request_id, "batch_id": previous.id, "field": name})
    return previous


def _shared(values) -> str:
    """The one value all of `values` have, else ""."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else ""


class BatchManager:
    def __init__(self, store: MetadataStore, files: FileManager, router: Router, providers: ProviderRegistry,
                 tracker: Tracker, hub: WatchHub, accounting: Accounting, page_tokens: PageTokens,
                 quotas: Quotas) -> None:
        self.store = store
        self.quotas = quotas
        self.files = files
        self.router = router
        self.providers = providers
        self.tracker = tracker
        self.hub = hub
        self.accounting = accounting
        self.page_tokens = page_tokens

    @exhausted_when_full
    async def create(self, principal: Principal, req: CreateBatch) -> BatchRecord:
        check_create(req)
        if req.request_id:
            previous = await self.store.get_batch_by_request_id(principal.project, req.request_id)
            if previous is not None:
                return replay(previous, req)
        source = await self.files.get(principal, req.input_file_id)
        await self.quotas.check_create_batch(principal.project)
        if source.purpose is not FilePurpose.BATCH:
            raise FailedPrecondition(f"file {source.id} has purpose {source.purpose.value!r}; a batch needs a "
                                     "file uploaded with purpose batch", "FILE_NOT_BATCH_INPUT",
                                     {"file_id": source.id, "purpose": source.purpose.value})
        if req.endpoint_required_unless_mixed and not req.endpoint and \
                len({g.endpoint for g in file_groups(source)}) < 2:
            raise _invalid("endpoint is required (it may be left out only for a file that mixes endpoints)",
                           "MISSING_ENDPOINT", "endpoint", "required")
        plan = plan_batch(source, endpoint=req.endpoint, model=req.model, model_map=req.model_map,
                          provider=req.provider, spread=req.spread, router=self.router, providers=self.providers)
        record = self._record(principal, req, source, plan)
        # Count the batch against its deployments now, not when a runner starts: creates that
        # run concurrently must see each other's load or they all land on the same deployment.
        loads = [(p.deployment_id, batch_load(p.count)) for p in plan.parts]
        for deployment_id, load in loads:
            self.router.add_load(deployment_id, load)
        adopted = False
        try:
            try:
                # Shielded: once the row is queued it will be committed even if the caller's
                # deadline fires, so the runner must be started in the same breath, or the batch
                # would sit in validating with nobody driving it until the next restart.
                await asyncio.shield(self._insert_and_adopt(record))
            except Duplicate:
                previous = await self.store.get_batch_by_request_id(principal.project, req.request_id)
                if previous is None:
                    raise
                return replay(previous, req)
            adopted = True
        finally:
            # The runner takes the reserved load over: a single job's until it ends, a parent's
            # until its shards, adopted by the split, count their own.
            if not adopted:
                for deployment_id, load in loads:
                    self.router.remove_load(deployment_id, load)
        log.info("batch %s created: %d requests in %d part(s) on %s, project %s", record.id, source.line_count,
                 len(plan.parts), ", ".join(sorted({p.deployment_id for p in plan.parts})), principal.project)
        return record

    def _record(self, principal: Principal, req: CreateBatch, source: FileRecord, plan: BatchPlan) -> BatchRecord:
        """The batch as created: today's single job on its deployment, or a parent carrying the plan
        whose endpoint, model and provider are set only when every part shares them."""
        deployments = [plan.deployments[p.deployment_id] for p in plan.parts]
        now = time.time()
        record = BatchRecord(
            id=new_batch_id(), project=principal.project, endpoint=_shared(p.endpoint for p in plan.parts),
            input_file_id=source.id, completion_window=req.completion_window, status=BatchStatus.VALIDATING,
            created_at=now, expires_at=now + COMPLETION_WINDOWS[req.completion_window],
            model=_shared(d.model_name for d in deployments), provider=_shared(d.provider for d in deployments),
            input_line_count=source.line_count, api_key_id=principal.key_id, request_id=req.request_id,
            metadata=dict(req.metadata), requested_model=req.model, requested_provider=req.provider,
            requested_model_map=dict(req.model_map), requested_spread=req.spread)
        if plan.sharded:
            record.plan = list(plan.parts)
        else:
            (deployment,) = deployments
            record.deployment_id = deployment.id
            record.price = self.accounting.snapshot(deployment.model, deployment.model_info, deployment.provider)
        return record

    async def _insert_and_adopt(self, record: BatchRecord) -> None:
        await self.quotas.insert_batch(record, owner=self.tracker.replica)
        self.tracker.adopt(copy.deepcopy(record), load_reserved=True)

    async def get(self, principal: Principal, batch_id: str, known: BatchRecord | None = None) -> BatchRecord:
        """`known`: a state of this batch the caller holds (never changes it), returned as is while it
        is the stored one, so that a poller's read of an unchanged batch decodes nothing. The store
        is asked every time (a sole writer of its database answers from the revisions it announced,
        store/ports.py assume_sole_writer), so the read sees every write before it, on any replica."""
        if not batch_id:
            raise _invalid("batch_id is required", "MISSING_BATCH_ID", "batch_id", "required")
        if known is not None and known.id == batch_id:
            record = await self.store.refresh_batch(known)
        else:
            record = await self.store.get_batch(batch_id)
        # A shard (domain/shards.py) is internal: callers see its parent only.
        if record is None or record.parent_id or not principal.can_see(record.project):
            raise not_found("batch", batch_id)
        return record

    async def list(self, principal: Principal, size: int, token: str, statuses: Sequence[BatchStatus],
                   weigh: Callable[[BatchRecord], int]) -> tuple[list[BatchRecord], str]:
        """A page of batches (see PageTokens.keyset_page; `weigh`: a batch's size in the response)."""
        filter_key = json.dumps(["batches", principal.scope, sorted(s.value for s in statuses)])
        return await self.page_tokens.keyset_page(
            size, token, filter_key,
            lambda limit, after: self.store.list_batches(principal.scope, statuses, limit, after), weigh)

    async def list_after(self, principal: Principal, limit: int, after_id: str,
                         weigh: Callable[[BatchRecord], int]) -> tuple[list[BatchRecord], bool]:
        """Up to `limit` batches after the batch `after_id` ("": from the start), newest first, and
        whether more follow: the HTTP listing, whose cursor is an id."""
        cursor = await after_cursor("batch", after_id, self.store.get_batch,
                                    lambda r: principal.can_see(r.project) and not r.parent_id)
        return await keyset_rows(limit, cursor,
                                 lambda size, after: self.store.list_batches(principal.scope, (), size, after), weigh)

    @exhausted_when_full
    async def cancel(self, principal: Principal, batch_id: str) -> BatchRecord:
        record = await self.get(principal, batch_id)
        if not record.status.is_terminal:
            record = await cancel_batch(self.tracker, record)
        if record.status.is_terminal:
            raise FailedPrecondition(f"batch {batch_id} has already ended ({record.status.value})",
                                     "BATCH_ALREADY_ENDED", {"batch_id": batch_id, "status": record.status.value})
        return record

    async def watch(self, principal: Principal, batch_id: str, start_revision: int,
                    heartbeat: float) -> AsyncIterator[BatchRecord | int]:
        """Yields Batch states newer than start_revision, and the current revision as an int when
        a heartbeat is due. Ends right after a terminal state. A start_revision beyond the current
        one cannot have been seen by anyone (revisions only grow): the watcher's view is unknown,
        so it is sent the current state first, as from 0."""
        await self.get(principal, batch_id)  # NOT_FOUND for other projects
        if start_revision < 0:
            raise _invalid("start_revision must not be negative", "INVALID_START_REVISION", "start_revision",
                           "must be >= 0")
        # Subscribe before reading the snapshot so no change can fall between the two.
        with self.hub.subscribe(batch_id) as slot:
            current = await self.store.get_batch(batch_id)
            sent = start_revision if start_revision <= current.revision else 0
            if current.revision > sent:
                yield current
                sent = current.revision
            if current.status.is_terminal:
                return
            while True:
                latest = await slot.next(heartbeat)
                if latest is None:
                    yield sent
                    continue
                if latest.revision <= sent:
                    continue
                yield latest
                sent = latest.revision
                if latest.status.is_terminal:
                    return
