"""Two replicas' webhook deliverers on one database (each backend of the contract suite): their
claims split the outbox, so a healthy receiver gets every event exactly once, none lost."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import Counter

from batchgate_server.core.webhooks import Webhooks
from batchgate_server.domain.models import BatchStatus
from batchgate_server.domain.webhooks import WebhookEndpoint
from tests.contract.test_metadata_store_contract import batch_record
from tests.fakes.webhook_receiver import WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"replicas-share-this-32-byte-key!").decode()
EVENTS = 40


async def all_delivered(store) -> bool:
    for i in range(EVENTS):
        if not (await store.outbox_events(f"batch_{i}"))[0].delivered_at:
            return False
    return True


async def test_two_deliverers_send_each_event_once(database_backend, database):
    receiver = WebhookReceiver()
    await receiver.start()
    stores = [database.metadata, (await database_backend.open()).metadata]
    await stores[0].add_webhook_endpoint(WebhookEndpoint(id="wh_1", project="p", url=receiver.url, secret=SECRET,
                                                         created_at=1.0))
    replicas = [Webhooks(store, poll_interval=0.02) for store in stores]
    tasks = [asyncio.create_task(r.run()) for r in replicas]
    try:
        for i in range(EVENTS):  # batches ending on either replica, as their trackers end them
            replica = replicas[i % 2]
            b = batch_record(f"batch_{i}")
            await replica.store.insert_batch(b)
            before, b.status = b.status, BatchStatus.COMPLETED
            await replica.store.update_batch(b, outbox=await replica.events_on_end(before, b))
            replica.wake()
        await receiver.wait_for(EVENTS)
        while not await all_delivered(stores[0]):
            await asyncio.sleep(0.02)
    finally:
        for task in tasks:  # stopped: nothing more can be sent
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await receiver.stop()
    per_id = Counter(r.headers["webhook-id"] for r in receiver.received)
    assert len(per_id) == EVENTS and set(per_id.values()) == {1}, per_id.most_common(3)
    for i in range(EVENTS):
        [e] = await stores[0].outbox_events(f"batch_{i}")
        assert e.attempts == 1
