"""Webhook events: written to the outbox in a batch's terminal transaction, then delivered by a
background deliverer, at least once, with the same webhook-id on every attempt.

Each replica runs a deliverer. It claims due events in the store for a lease (the delivery
timeout and a margin), so two replicas do not send one event at once; a replica that dies
mid-delivery leaves its claim to expire and another (or itself, restarted) sends the event again.
A failed attempt (not 2xx, a timeout, a refused connection) is retried on the retry schedule
(Standard Webhooks' by default: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h after the previous
attempt), then given up and left in the outbox with its last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence

import aiohttp

from batchgate_server.core.auth import Principal
from batchgate_server.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from batchgate_server.domain.models import BatchRecord, BatchStatus
from batchgate_server.domain.webhooks import (
    ALL_EVENTS,
    EVENT_TYPES,
    OutboxEvent,
    WebhookEndpoint,
    event_body,
    new_endpoint_id,
    new_event_id,
    new_webhook_secret,
    secret_key,
    signature,
    webhook_events_problem,
    webhook_url_problem,
)
from batchgate_server.store.errors import StorageError
from batchgate_server.store.ports import MetadataStore

log = logging.getLogger(__name__)

# Standard Webhooks' schedule: seconds after each failed attempt until the next one.
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
DEFAULT_TIMEOUT = 15.0
LEASE_MARGIN = 15.0  # a claim outlives the delivery timeout by this much
CLAIM_LIMIT = 32  # events claimed (and sent concurrently) at once
POLL_INTERVAL = 2.0  # seconds between claims when idle: retries and other replicas' events
USER_AGENT = "batchgate-webhooks/1"
MAX_PROJECT_LENGTH = 128


class Webhooks:
    def __init__(self, store: MetadataStore, configured: Sequence[WebhookEndpoint] = (), *,
                 retry_schedule: Sequence[float] = DEFAULT_RETRY_SCHEDULE, timeout: float = DEFAULT_TIMEOUT,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.store = store
        self.configured = {e.id: e for e in configured}
        self.retry_schedule = tuple(retry_schedule)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.owner = "deliverer-" + secrets.token_hex(8)  # this process's claims
        self._wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None

    # -- the outbox, written by the tracker

    async def endpoints(self, project: str | None) -> list[WebhookEndpoint]:
        """The configured endpoints of `project` (None: all), then those added through the API."""
        configured = [e for e in self.configured.values() if project is None or e.project == project]
        return configured + await self.store.list_webhook_endpoints(project)

    async def events_on_end(self, before: BatchStatus, rec: BatchRecord) -> list[OutboxEvent]:
        """The outbox rows to write with `rec`'s change from `before`: one event per subscribed
        endpoint when the batch has just ended, none otherwise."""
        event_type = EVENT_TYPES.get(rec.status)
        if event_type is None or before.is_terminal or rec.parent_id:  # a shard: its parent tells
            return []
        subscribed = [e for e in await self.endpoints(rec.project) if event_type in e.events]
        if not subscribed:
            return []
        now, event_id = time.time(), new_event_id()
        body = event_body(event_id, event_type, rec.id, int(now))
        return [OutboxEvent(event_id=event_id, endpoint_id=e.id, project=rec.project, batch_id=rec.id,
                            event_type=event_type, body=body, created_at=now, next_attempt_at=now)
                for e in subscribed]

    # -- endpoints, for WebhookService (master key only)

    async def create_endpoint(self, principal: Principal, project: str, url: str, events: Sequence[str],
                              secret: str) -> tuple[WebhookEndpoint, str]:
        """The new endpoint and its secret (made here unless given)."""
        _require_master(principal)
        if not project or len(project) > MAX_PROJECT_LENGTH or not project.isprintable():
            raise InvalidArgument("project must be 1 to 128 printable characters", "INVALID_WEBHOOK_PROJECT",
                                  violations=[FieldViolation("project", "1 to 128 printable characters")])
        if problem := webhook_url_problem(url):
            raise InvalidArgument(f"url {problem}", "INVALID_WEBHOOK_URL", violations=[FieldViolation("url", problem)])
        events = list(dict.fromkeys(events)) or list(ALL_EVENTS)
        if problem := webhook_events_problem(events):
            raise InvalidArgument(f"events {problem}", "INVALID_WEBHOOK_EVENTS",
                                  violations=[FieldViolation("events", problem)])
        if secret:
            try:
                secret_key(secret)
            except ValueError as err:  # the rule, never the value
                raise InvalidArgument(f"secret: {err}", "INVALID_WEBHOOK_SECRET",
                                      violations=[FieldViolation("secret", str(err))]) from None
        else:
            secret = new_webhook_secret()
        endpoint = WebhookEndpoint(id=new_endpoint_id(), project=project, url=url, secret=secret,
                                   events=tuple(events), created_at=time.time())
        await self.store.add_webhook_endpoint(endpoint)
        log.info("webhook endpoint %s added for project %s (%s)", endpoint.id, project, ", ".join(events))
        return endpoint, secret

    async def list_endpoints(self, principal: Principal, project: str) -> list[WebhookEndpoint]:
        _require_master(principal)
        return await self.endpoints(project or None)

    async def delete_endpoint(self, principal: Principal, endpoint_id: str) -> None:
        _require_master(principal)
        if endpoint_id in self.configured:
            raise FailedPrecondition(f"webhook endpoint {endpoint_id} is in the config file; remove it there",
                                     "WEBHOOK_ENDPOINT_CONFIGURED", {"id": endpoint_id})
        if not await self.store.delete_webhook_endpoint(endpoint_id):
            raise NotFound(f"no webhook endpoint {endpoint_id[:64]!r}", "WEBHOOK_ENDPOINT_NOT_FOUND",
                           {"id": endpoint_id[:64]})
        log.info("webhook endpoint %s deleted", endpoint_id)

    def wake(self) -> None:
        """New events were committed: deliver now rather than at the next poll."""
        self._wake.set()

    # -- the deliverer

    async def run(self) -> None:
        # aiohttp's client (aiohttp already serves the HTTP API): it logs no request lines, so an
        # endpoint URL holding a token never reaches the logs (httpx logs every URL at INFO).
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                           headers={"user-agent": USER_AGENT})
        try:
            while True:
                self._wake.clear()
                try:
                    due = await self.store.claim_outbox(self.owner, time.time(), self.timeout + LEASE_MARGIN,
                                                        CLAIM_LIMIT)
                except StorageError as err:
                    log.warning("webhook outbox unreadable, retrying: %s", err)
                    due = []
                if due:
                    await asyncio.gather(*(self._deliver(e) for e in due))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        finally:
            await self._http.close()

    async def _endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        return self.configured.get(endpoint_id) or await self.store.get_webhook_endpoint(endpoint_id)

    async def _deliver(self, e: OutboxEvent) -> None:
        try:
            endpoint = await self._endpoint(e.endpoint_id)
            if endpoint is None:
                log.warning("webhook %s of batch %s dropped: endpoint %s was deleted", e.event_id, e.batch_id,
                            e.endpoint_id)
                await self.store.outbox_failed(e.event_id, e.endpoint_id, self.owner, "endpoint deleted", None,
                                               time.time())
                return
            error = await self._send(endpoint, e)
            now = time.time()
            if error is None:
                await self.store.outbox_delivered(e.event_id, e.endpoint_id, now)
                log.info("webhook %s (%s of batch %s) delivered to endpoint %s, attempt %d", e.event_id,
                         e.event_type, e.batch_id, e.endpoint_id, e.attempts + 1)
                return
            retry_at = (now + self.retry_schedule[e.attempts]) if e.attempts < len(self.retry_schedule) else None
            await self.store.outbox_failed(e.event_id, e.endpoint_id, self.owner, error, retry_at, now)
            if retry_at is None:
                log.error("webhook %s of batch %s to endpoint %s given up after %d attempts: %s", e.event_id,
                          e.batch_id, e.endpoint_id, e.attempts + 1, error)
            else:
                log.warning("webhook %s of batch %s to endpoint %s failed (attempt %d: %s), retry in %.1f s",
                            e.event_id, e.batch_id, e.endpoint_id, e.attempts + 1, error, retry_at - now)
        except StorageError as err:  # the claim expires and the event is sent again
            log.warning("webhook %s: outbox not updated: %s", e.event_id, err)

    async def _send(self, endpoint: WebhookEndpoint, e: OutboxEvent) -> str | None:
        """None when the endpoint took the event (2xx), else why not (never the URL or secret)."""
        assert self._http is not None
        timestamp = int(time.time())  # of this attempt: receivers reject stale ones
        headers = {"content-type": "application/json", "webhook-id": e.event_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": signature(endpoint.secret, e.event_id, timestamp, e.body)}
        try:
            async with self._http.post(endpoint.url, data=e.body.encode(), headers=headers,
                                       allow_redirects=False) as response:
                status = response.status
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError) as err:
            return f"request failed ({type(err).__name__})"
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"


def _require_master(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("webhook endpoints are managed with the master key", "WEBHOOK_MASTER_KEY_REQUIRED")
