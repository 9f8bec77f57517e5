"""The cluster test: three replicas on one database and one blob store; 20 batches created
through random replicas, half on the built-in executor (fake upstream), half on the OpenAI batch
API (fake); a watcher for every batch on every replica; one replica killed with -9, restarted, and
another killed with -9, all mid-run. Every batch ends, every custom_id is answered exactly once,
each batch has one ledger row and (on OpenAI) one provider job, and every watcher sees the end."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from batchgate.v1 import batch_pb2
from batchgate_server.providers.openai_batch.provider import METADATA_KEY
from tests.conftest import jsonl, request_line, upload_requests
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.fakes.openai_compatible_upstream import FakeUpstream
from tests.integration.batch_helpers import TERMINAL, create, results, upstream_entry, write_config
from tests.replicas import Cluster, Replica, stores  # noqa: F401 - stores is a fixture

pytestmark = pytest.mark.slow

BATCHES = 20
EXECUTOR_LINES = 80
OPENAI_LINES = 12
OPENAI_KEY = "sk-cluster-test"
ACTIVE = "status NOT IN ('failed', 'completed', 'expired', 'cancelled')"


def replica_id(replica: Replica) -> str:
    return (replica.data_dir / "replica-id").read_text().strip()


async def follow(cluster: Cluster, batch_id: str, first: Replica) -> list[batch_pb2.Batch]:
    """A watcher that starts on `first` and, when its replica dies, goes on from the revision it
    had on another live replica (as a client behind a load balancer would)."""
    states: list[batch_pb2.Batch] = []
    replica = first
    while True:
        since = states[-1].revision if states else 0
        try:
            async for event in replica.caller.batches.WatchBatch(
                    batch_pb2.WatchBatchRequest(batch_id=batch_id, start_revision=since),
                    metadata=replica.caller.metadata, timeout=170):
                if event.WhichOneof("event") == "batch":
                    states.append(event.batch)
            return states
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.UNKNOWN):
                raise
            await asyncio.sleep(0.1)
            replica = random.choice(cluster.alive())


async def until(condition, timeout: float, what: str) -> float:
    """Poll `condition()` (blocking: run on a thread) until true; the seconds it took."""
    start = time.monotonic()
    while not await asyncio.to_thread(condition):
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_three_replicas_two_kills(tmp_path: Path, stores):
    upstream = FakeUpstream()
    await upstream.start()
    openai = FakeBatchAPI(api_key=OPENAI_KEY, clock="time", step_ms=400, lines_per_tick=1)
    await openai.start()
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-llm", upstream.base_url, max_concurrency=4),
        {"model_name": "gpt-batch", "litellm_params": {
            "model": "openai/gpt-4o-mini-2024-07-18", "api_key": OPENAI_KEY, "api_base": openai.base_url,
            "poll_interval": 0.1, "max_retries": 2, "backoff_base": 0.01, "timeout": 5,
            "create_lookup_patience": 0.5, "not_found_grace": 1}}])
    cluster = Cluster(tmp_path, stores, config, lease_timeout=2.0)
    rng = random.Random(10)
    try:
        replicas = await cluster.start(3)
        expected: dict[str, list[str]] = {}
        for i in range(BATCHES):
            on_executor = i % 2 == 0
            n, model = (EXECUTOR_LINES, "fake-llm") if on_executor else (OPENAI_LINES, "gpt-batch")
            ids = [f"b{i}-r{j}" for j in range(n)]
            content = jsonl([request_line(c, model=model, content=f"SLOW:150 {c}" if on_executor else c) for c in ids])
            via = rng.choice(replicas).caller
            f = (await via.files.UploadFile(upload_requests(content), metadata=via.metadata)).file
            batch = await create(via, f.id)
            expected[batch.id] = ids
        watchers = [asyncio.create_task(follow(cluster, batch_id, r)) for batch_id in expected for r in replicas]

        def active(replica: Replica) -> int:
            return stores.scalar(f"SELECT count(*) FROM batches WHERE owner=? AND {ACTIVE}", (replica_id(replica),))

        first = replicas[0]
        await until(lambda: active(first) > 0 and upstream.requests_total > 100, 60, "the first replica to be busy")
        await cluster.kill(first)
        took = await until(lambda: active(first) == 0, 60, "its batches to be adopted")
        assert took < 2 * cluster.lease_timeout + 3
        await cluster.restart(first)
        # The second kill: the replica driving the most batches now.
        counts = {r.index: await asyncio.to_thread(active, r) for r in cluster.alive()}
        second = max(cluster.alive(), key=lambda r: counts[r.index])
        assert counts[second.index] > 0, f"batches still running at the second kill: {counts}"
        await cluster.kill(second)

        done = await asyncio.wait_for(asyncio.gather(*watchers), 170)
        finals: dict[str, batch_pb2.Batch] = {}
        for states, (batch_id, _) in zip(done, [(b, r) for b in expected for r in replicas]):
            revisions = [s.revision for s in states]
            assert revisions == sorted(set(revisions)), f"{batch_id}: a watcher saw {revisions}"
            assert states[-1].status in TERMINAL, f"{batch_id}: a watcher missed the end"
            finals.setdefault(batch_id, states[-1])
            assert states[-1].revision == finals[batch_id].revision
        caller = cluster.alive()[0].caller
        for batch_id, ids in expected.items():
            final = finals[batch_id]
            assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, (batch_id, final.status, final.errors)
            out, err = await results(caller, final)
            answered = Counter(line["custom_id"] for line in out + err)
            assert sorted(answered) == sorted(ids) and set(answered.values()) == {1}, \
                f"{batch_id}: every custom_id answered exactly once"
            assert stores.scalar("SELECT count(*) FROM usage_ledger WHERE batch_id=?", (batch_id,)) == 1
        jobs = Counter(body.get("metadata", {}).get(METADATA_KEY) for body in openai.created_batch_requests)
        on_openai = [b for i, b in enumerate(expected) if i % 2 == 1]
        assert all(jobs[b] == 1 for b in on_openai), f"one provider job per batch: {jobs}"
        assert stores.scalar("SELECT count(*) FROM executor_results", ()) == 0
        # Resumed, not restarted: little was sent twice to the upstream.
        assert upstream.requests_total < EXECUTOR_LINES * BATCHES // 2 * 1.25
    finally:
        await cluster.close()
        await openai.stop()
        await upstream.stop()
