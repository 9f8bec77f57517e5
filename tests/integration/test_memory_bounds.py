"""What the server keeps per call must go when the call (or its batch) ends: nothing a client does
over and over may grow the server's memory for good (bench/soak.py measures the whole process)."""

from __future__ import annotations

from batchgate.v1 import batch_pb2
from batchgate_server.core.routing import ADHOC_PREFIX
from tests.conftest import batch_file
from tests.integration.batch_helpers import create, watch_all


async def test_ad_hoc_model_names_leave_no_router_state_behind(harness):
    """Every "provider/model" a client names is a deployment of its own: its queue entry in the
    router must go when its batch ends, or a client naming a new model per batch grows the map
    forever."""
    source = await harness.upload(harness.alice, batch_file(2, model="simulated/echo"))
    for i in range(5):
        batch = await create(harness.alice, source.id, model=f"simulated/echo-{i}")
        assert (await watch_all(harness.alice, batch.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    router = harness.server.router
    assert [d for d in router._queued if d.startswith(ADHOC_PREFIX)] == []
