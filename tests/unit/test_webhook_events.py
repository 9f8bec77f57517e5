"""Which outbox events a batch change writes: one per subscribed endpoint of the batch's project
when it has just ended (OpenAI's four event types), none for any other change."""

from __future__ import annotations

import json

import pytest

from batchgate_server.core.webhooks import Webhooks
from batchgate_server.domain.models import BatchStatus
from batchgate_server.domain.webhooks import WebhookEndpoint, new_webhook_secret
from batchgate_server.store.sqlite.metadata import SqliteMetadataStore
from tests.contract.test_metadata_store_contract import batch_record


@pytest.fixture
async def webhooks(tmp_path):
    store = await SqliteMetadataStore.open(tmp_path / "db.sqlite3")
    configured = [WebhookEndpoint(id="wh_cfg_all", project="p", url="https://a.example/h", secret=new_webhook_secret(),
                                  from_config=True),
                  WebhookEndpoint(id="wh_cfg_other", project="q", url="https://b.example/h",
                                  secret=new_webhook_secret(), from_config=True)]
    await store.add_webhook_endpoint(WebhookEndpoint(id="wh_failures", project="p", url="https://c.example/h",
                                                     secret=new_webhook_secret(), events=("batch.failed",),
                                                     created_at=1.0))
    yield Webhooks(store, configured)
    await store.close()


@pytest.mark.parametrize("status, event_type, endpoints", [
    (BatchStatus.COMPLETED, "batch.completed", ["wh_cfg_all"]),
    (BatchStatus.FAILED, "batch.failed", ["wh_cfg_all", "wh_failures"]),
    (BatchStatus.EXPIRED, "batch.expired", ["wh_cfg_all"]),
    (BatchStatus.CANCELLED, "batch.cancelled", ["wh_cfg_all"]),
])
async def test_an_ending_writes_one_event_per_subscribed_endpoint(webhooks, status, event_type, endpoints):
    b = batch_record("batch_1", project="p")
    b.status = status
    events = await webhooks.events_on_end(BatchStatus.IN_PROGRESS, b)
    assert [e.endpoint_id for e in events] == endpoints
    assert len({e.event_id for e in events}) == 1 and len({e.body for e in events}) == 1  # one event, fanned out
    body = json.loads(events[0].body)
    assert body == {"id": events[0].event_id, "object": "event", "created_at": body["created_at"], "type": event_type,
                    "data": {"id": "batch_1"}}
    assert isinstance(body["created_at"], int)


@pytest.mark.parametrize("before, after", [
    (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS),
    (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING),
    (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING),
    (BatchStatus.COMPLETED, BatchStatus.COMPLETED),  # a later save of an ended batch
])
async def test_other_changes_write_no_event(webhooks, before, after):
    b = batch_record("batch_1", project="p")
    b.status = after
    assert await webhooks.events_on_end(before, b) == []


async def test_a_project_without_endpoints_writes_none(webhooks):
    b = batch_record("batch_1", project="nobody")
    b.status = BatchStatus.COMPLETED
    assert await webhooks.events_on_end(BatchStatus.IN_PROGRESS, b) == []
