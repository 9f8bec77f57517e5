"""What the server keeps per call must go when the call (or its batch) ends: nothing a client does
over and over may grow the server's memory for good (bench/soak.py measures the whole process)."""

from __future__ import annotations

import asyncio

from batchgate.v1 import batch_pb2
from batchgate_server.core.routing import ADHOC_PREFIX
from tests.conftest import batch_file
from tests.integration.batch_helpers import create, watch_all


async def run_on_new_model_names(h, count: int) -> None:
    """`count` batches, each on a "provider/model" of its own: an ad-hoc deployment each."""
    source = await h.upload(h.alice, batch_file(2, model="simulated/echo"))
    for i in range(count):
        batch = await create(h.alice, source.id, model=f"simulated/echo-{i}")
        assert (await watch_all(h.alice, batch.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    # A runner cleans up just after it has published the terminal state (its release can take a few
    # store round trips on PostgreSQL): wait, boundedly, for the last one to be gone.
    async with asyncio.timeout(10):
        while h.server.tracker.runner(batch.id) is not None:
            await asyncio.sleep(0.01)


def ad_hoc(deployment_ids) -> list[str]:
    return [d for d in deployment_ids if d.startswith(ADHOC_PREFIX)]


async def test_ad_hoc_model_names_leave_no_router_state_behind(harness):
    """The router's queue entry of an ad-hoc deployment goes when its batch ends, or a client
    naming a new model per batch grows the map forever."""
    await run_on_new_model_names(harness, 5)
    assert ad_hoc(harness.server.router._queued) == []


async def test_ad_hoc_model_names_leave_no_executor_state_behind(harness):
    """The executor builds a transport, a rate limiter and a health record per deployment; for an
    ad-hoc one they go with its last batch (for an HTTP upstream the transport holds a connection
    pool)."""
    await run_on_new_model_names(harness, 5)
    executor = harness.server.providers.get("openai_compatible")
    assert ad_hoc([*executor._transports, *executor._limiters, *executor._health]) == []
