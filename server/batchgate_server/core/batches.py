"""The Batch use cases: create (validate, route, hand to the tracker), get, list, cancel, watch."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from batchgate_server.core.accounting import Accounting
from batchgate_server.core.auth import Principal
from batchgate_server.core.errors import invalid_field as _invalid
from batchgate_server.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
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
from batchgate_server.core.shard_plan import BatchPlan, plan_batch
from batchgate_server.core.tracker import Tracker, batch_load, cancel_batch
from batchgate_server.core.watch_hub import WatchHub
from batchgate_server.domain.ids import new_batch_id
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import BatchRecord, BatchStatus, FilePurpose, FileRecord
from batchgate_server.providers.base import UnsupportedRequest
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


@dataclass
class CreateBatch:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    model: str = ""
    provider: str = ""
    request_id: str = ""


def check_create(req: CreateBatch) -> None:
    if not req.input_file_id:
        raise _invalid("input_file_id is required", "MISSING_INPUT_FILE_ID", "input_file_id", "required")
    if req.endpoint and req.endpoint not in SUPPORTED_ENDPOINTS:  # "": the file's own endpoints
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


def replay(previous: BatchRecord, req: CreateBatch) -> BatchRecord:
    """The batch `req.request_id` created, if `req` asks for the same batch; REQUEST_ID_REUSED
    naming the first parameter that differs otherwise (a key names one request, as in AIP-155)."""
    asked = {"input_file_id": previous.input_file_id, "endpoint": previous.endpoint,
             "completion_window": previous.completion_window, "metadata": previous.metadata,
             "model": previous.requested_model, "provider": previous.requested_provider}
    for name, value in asked.items():
        if value is not None and getattr(req, name) != value:
            raise FailedPrecondition(
                f"request_id {echo(req.request_id)} already created batch {previous.id} with another {name};"
                " use a new request_id for another batch", "REQUEST_ID_REUSED",
                {"request_id": req.request_id, "batch_id": previous.id, "field": name})
    return previous


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
        if len(source.groups) <= 1 and source.endpoint != req.endpoint:
            raise _invalid(f"the batch endpoint {req.endpoint!r} does not match the file's url {source.endpoint!r}",
                           "ENDPOINT_MISMATCH", "endpoint", f"the file's requests target {source.endpoint}",
                           file_endpoint=source.endpoint)
        plan = plan_batch(source, endpoint=req.endpoint, model=req.model, model_map={}, provider=req.provider,
                          spread=False, router=self.router, providers=self.providers)
        if plan.sharded:
            return await self._create_sharded(principal, req, source, plan)
        deployment = self.router.pick(requested_model=req.model, file_model=source.model, provider=req.provider)
        # Count the batch against its deployment now, not when its runner starts: creates that
        # run concurrently must see each other's load or they all land on the same deployment.
        load = batch_load(source.line_count)
        self.router.add_load(deployment.id, load)
        adopted = False
        try:
            self._check_provider(deployment, req.endpoint, source.line_count)
            now = time.time()
            record = BatchRecord(
                id=new_batch_id(), project=principal.project, endpoint=req.endpoint, input_file_id=source.id,
                completion_window=req.completion_window, status=BatchStatus.VALIDATING, created_at=now,
                expires_at=now + COMPLETION_WINDOWS[req.completion_window], model=deployment.model_name,
                provider=deployment.provider, deployment_id=deployment.id, input_line_count=source.line_count,
                api_key_id=principal.key_id, request_id=req.request_id, metadata=dict(req.metadata),
                price=self.accounting.snapshot(deployment.model, deployment.model_info, deployment.provider),
                requested_model=req.model, requested_provider=req.provider,
            )
            stored = await self._insert_or_replay(principal, req, record)
            if stored is not record:
                return stored
            adopted = True
        finally:
            if not adopted:
                self.router.remove_load(deployment.id, load)
        log.info("batch %s created: %d requests on %s (%s), project %s", record.id, source.line_count,
                 deployment.model_name, deployment.provider, principal.project)
        return record

    def _check_provider(self, deployment: Deployment, endpoint: str, line_count: int) -> None:
        try:
            provider = self.providers.get(deployment.provider)
            provider.check(endpoint, deployment, line_count)
        except UnsupportedRequest as err:
            details = {"provider": deployment.provider, **err.details}
            if err.precondition:
                raise FailedPrecondition(err.message, err.reason, details) from None
            raise InvalidArgument(err.message, err.reason, details,
                                  [FieldViolation("endpoint" if "ENDPOINT" in err.reason else "model",
                                                  err.message)]) from None

    async def _create_sharded(self, principal: Principal, req: CreateBatch, source: FileRecord,
                              plan: BatchPlan) -> BatchRecord:
        """A batch run as several jobs (domain/shards.py): the parent carries the plan; its runner
        (core/sharded.py) splits it into shards, which count their own load when they start."""
        for part in plan.parts:
            deployment = plan.deployments[part.deployment_id]
            # Checked as one of its jobs (at most the provider's max_requests): the split makes them.
            most = self.providers.get(deployment.provider).limits(part.endpoint, deployment).max_requests
            self._check_provider(deployment, part.endpoint, min(part.count, most or part.count))
        used = [plan.deployments[p.deployment_id] for p in plan.parts]
        # Each set only when every part shares it.
        models, providers = {d.model_name for d in used}, {d.provider for d in used}
        model = models.pop() if len(models) == 1 else ""
        provider = providers.pop() if len(providers) == 1 else ""
        now = time.time()
        record = BatchRecord(
            id=new_batch_id(), project=principal.project, endpoint=req.endpoint, input_file_id=source.id,
            completion_window=req.completion_window, status=BatchStatus.VALIDATING, created_at=now,
            expires_at=now + COMPLETION_WINDOWS[req.completion_window], model=model, provider=provider,
            input_line_count=source.line_count, api_key_id=principal.key_id, request_id=req.request_id,
            metadata=dict(req.metadata), requested_model=req.model, requested_provider=req.provider,
            plan=list(plan.parts))
        stored = await self._insert_or_replay(principal, req, record)
        if stored is record:
            log.info("batch %s created: %d requests in %d part(s), project %s", record.id, source.line_count,
                     len(plan.parts), principal.project)
        return stored

    async def _insert_or_replay(self, principal: Principal, req: CreateBatch, record: BatchRecord) -> BatchRecord:
        """`record`, stored and driven; or the batch req.request_id made meanwhile (another create)."""
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
        return record

    async def _insert_and_adopt(self, record: BatchRecord) -> None:
        await self.store.insert_batch(record, owner=self.tracker.replica)
        self.tracker.adopt(copy.deepcopy(record), load_reserved=True)

    async def get(self, principal: Principal, batch_id: str) -> BatchRecord:
        if not batch_id:
            raise _invalid("batch_id is required", "MISSING_BATCH_ID", "batch_id", "required")
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
