"""A sharded batch (domain/shards.py) across replicas sharing one database and blob store: a
cancel sent to another replica reaches every shard; a replica killed with -9 mid-batch has the
batch and its shards taken over by another, which finishes them with every custom_id answered
once and one ledger row per shard."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from batchgate.v1 import batch_pb2
from tests.integration.batch_helpers import results, upstream_entry, write_config
from tests.integration.test_replicas import slow_lines, upload_and_create, upstream, watch  # noqa: F401
from tests.replicas import Cluster, stores  # noqa: F401 - stores and upstream are fixtures

pytestmark = pytest.mark.slow

N = 120
PER_JOB = 40


@pytest.fixture
async def cluster(tmp_path: Path, upstream, stores):  # noqa: F811
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-llm", upstream.base_url, max_concurrency=4, max_batch_requests=PER_JOB)])
    c = Cluster(tmp_path, stores, config, lease_timeout=2.0)
    yield c
    await c.close()


def ledger_rows(cluster, parent_id: str, shard_ids) -> Counter:
    return Counter({s: cluster.stores.scalar("SELECT count(*) FROM usage_ledger WHERE batch_id=?", (s,))
                    for s in [parent_id, *shard_ids]})


async def test_a_cancel_on_another_replica_reaches_every_shard(cluster):
    a, b = await cluster.start(2)
    batch = await upload_and_create(a.caller, slow_lines(N, 150))
    await watch(b.caller, batch.id, until=lambda s: s.request_counts.completed > 0)
    cancelled = (await b.caller.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                    metadata=b.caller.metadata)).batch
    assert cancelled.status == batch_pb2.BATCH_STATUS_CANCELLING
    final = (await watch(b.caller, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    statuses = [s.status for s in final.shards]
    assert len(statuses) == 3 and set(statuses) <= {batch_pb2.BATCH_STATUS_CANCELLED, batch_pb2.BATCH_STATUS_COMPLETED}
    assert batch_pb2.BATCH_STATUS_CANCELLED in statuses, "the cancel reached the shards still running"
    out, err = await results(b.caller, final)
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"r-{i}" for i in range(N))
    assert 0 < len(out) < N and {x["error"]["code"] for x in err} == {"batch_cancelled"}
    assert ledger_rows(cluster, batch.id, [s.id for s in final.shards]) == Counter(
        {batch.id: 0, **{s.id: 1 for s in final.shards}})


async def test_kill_9_of_the_owner_another_replica_finishes_the_batch_and_its_shards(cluster, upstream):  # noqa: F811
    a, b = await cluster.start(2)
    batch = await upload_and_create(a.caller, slow_lines(N, 40))
    await watch(b.caller, batch.id, until=lambda s: s.request_counts.completed >= N // 4)
    await cluster.kill(a)
    final = (await watch(b.caller, batch.id, timeout=120))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    out, err = await results(b.caller, final)
    assert sorted(x["custom_id"] for x in out) == sorted(f"r-{i}" for i in range(N)) and not err
    assert ledger_rows(cluster, batch.id, [s.id for s in final.shards]) == Counter(
        {batch.id: 0, **{s.id: 1 for s in final.shards}})
