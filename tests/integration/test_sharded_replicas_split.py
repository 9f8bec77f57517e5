"""A cancel sent to another replica while the owner is still splitting a sharded batch
(core/sharded.py _split): the owner's split commit meets the stored cancel (a revision
conflict), the shards start cancelled, nothing reaches the upstream, every custom_id is answered
once (batch_cancelled) and nothing is charged."""

from __future__ import annotations

from pathlib import Path

import pytest
from batchgate.v1 import batch_pb2

from tests.conftest import jsonl, request_line
from tests.integration.batch_helpers import results, upstream_entry, write_config
from tests.integration.test_replicas import upload_and_create, upstream, watch  # noqa: F401
from tests.replicas import Cluster, stores  # noqa: F401 - stores and upstream are fixtures

pytestmark = pytest.mark.slow

N = 50_000


@pytest.fixture
async def cluster(tmp_path: Path, upstream, stores):  # noqa: F811
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-llm", upstream.base_url, max_concurrency=4, max_batch_requests=20_000)])
    c = Cluster(tmp_path, stores, config, lease_timeout=2.0)
    yield c
    await c.close()


async def test_a_cancel_on_another_replica_during_the_split_cancels_before_any_request(cluster, upstream):  # noqa: F811
    a, b = await cluster.start(2)
    lines = [request_line(f"r-{i}", model="fake-llm", content=f"question {i}") for i in range(N)]
    batch = await upload_and_create(a.caller, jsonl(lines))
    cancelled = (await b.caller.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                    metadata=b.caller.metadata)).batch
    assert cancelled.status == batch_pb2.BATCH_STATUS_CANCELLING
    states = await watch(b.caller, batch.id, timeout=120)
    final = states[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED, final
    assert [s.status for s in states].count(batch_pb2.BATCH_STATUS_CANCELLED) == 1
    out, err = await results(b.caller, final)
    assert sorted(x["custom_id"] for x in out + err) == sorted(x["custom_id"] for x in lines)
    if upstream.requests_total == 0:  # the cancel met the split: nothing ran, nothing is charged
        assert out == [] and {x["error"]["code"] for x in err} == {"batch_cancelled"}
        assert final.cost.amount in ("", "0")
