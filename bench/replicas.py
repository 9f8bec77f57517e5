"""Replicas: GetBatch and WatchBatch fan-out with 1 and 3 replicas on shared stores, beside one
server on its own SQLite (no URLs, the default); and the time from a replica's death (kill -9) to
its batch moving on at another.

Every replica is a batchgate-server process (tests/replicas.py); the callers and watchers run in
this process. Figures:
- GetBatch: calls/s and p50/p99 latency of CALLERS concurrent callers spread over the replicas,
  and the ratio to the default single server measured in the same run (the machine's ceiling
  for this workload).
- WatchBatch: WATCHERS watchers spread over the replicas on one running batch (simulated model,
  driven by replica 0). For each revision, the delay from the first watcher that got it to each
  of the others: p50/p99 for watchers on the owner and on the other replicas (cross-replica
  delivery: change feed wake-up or poll, then a read).
- Executor: EXECUTOR_REQUESTS requests on the simulated model (no latency) through one replica,
  create to completed, requests/s: what storing the answers for other replicas (one segment a
  second) costs against the default server.
- Takeover: kill -9 of the replica driving a batch; seconds until a watcher on another replica
  sees the batch progress again, for the lease timeouts in TAKEOVER_LEASES.

    python bench/replicas.py [sqlite] [postgres+s3]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import changes, percentile  # noqa: E402

import yaml  # noqa: E402

from batchgate.v1 import batch_pb2  # noqa: E402
from tests.conftest import jsonl, request_line, upload_requests  # noqa: E402
from tests.replicas import Cluster, local_stores, shared_stores  # noqa: E402

CALLERS = 64
GET_SECONDS = float(os.environ.get("GET_SECONDS", "5"))
WATCHERS = int(os.environ.get("WATCHERS", "300"))
REQUESTS = 1500
EXECUTOR_REQUESTS = int(os.environ.get("EXECUTOR_REQUESTS", "20000"))
TAKEOVER_LEASES = [float(x) for x in os.environ.get("TAKEOVER_LEASES", "2,15").split(",")]


def write_model_list(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "slow-sim", "litellm_params": {"model": "simulated/echo", "latency_ms": 40,
                                                      "max_concurrency": 16}},
        {"model_name": "fast-sim", "litellm_params": {"model": "simulated/echo", "max_concurrency": 256}}]}))
    return path


def lines(n: int, model: str = "slow-sim") -> bytes:
    return jsonl([request_line(f"q{i}", model=model, content=f"hi {i}") for i in range(n)])


async def new_batch(caller, n: int = REQUESTS, model: str = "slow-sim") -> batch_pb2.Batch:
    f = (await caller.files.UploadFile(upload_requests(lines(n, model)), metadata=caller.metadata)).file
    return (await caller.batches.CreateBatch(batch_pb2.CreateBatchRequest(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
        metadata=caller.metadata)).batch


async def get_batch_load(cluster: Cluster, batch_id: str) -> dict:
    replicas = cluster.alive()
    latencies: list[float] = []
    stop_at = time.perf_counter() + GET_SECONDS

    async def caller(i: int) -> None:
        c = replicas[i % len(replicas)].caller
        request = batch_pb2.GetBatchRequest(batch_id=batch_id)
        while (start := time.perf_counter()) < stop_at:
            await c.batches.GetBatch(request, metadata=c.metadata)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    elapsed = time.perf_counter() - began
    return {"calls_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3}


async def watch_fan_out(cluster: Cluster) -> dict:
    replicas = cluster.alive()
    owner = replicas[0]
    batch = await new_batch(owner.caller)
    got: list[tuple[int, int, float]] = []  # (replica index, revision, time)
    connected = 0
    all_connected = asyncio.Event()

    def on_connected() -> None:
        nonlocal connected
        connected += 1
        if connected == WATCHERS:
            all_connected.set()

    async def watcher(i: int) -> None:
        r = replicas[i % len(replicas)]
        stream = r.caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                             metadata=r.caller.metadata, timeout=300)
        got.extend([(r.index, revision, at) async for revision, at in changes(stream, on_connected)])

    tasks = [asyncio.create_task(watcher(i)) for i in range(WATCHERS)]
    await asyncio.gather(*tasks)
    first_seen: dict[int, float] = {}
    for _, revision, at in got:
        first_seen[revision] = min(at, first_seen.get(revision, at))
    on_owner = [at - first_seen[rev] for idx, rev, at in got if idx == owner.index]
    elsewhere = [at - first_seen[rev] for idx, rev, at in got if idx != owner.index]
    result = {"revisions": len(first_seen), "owner_p50_ms": percentile(on_owner, 50) * 1e3,
              "owner_p99_ms": percentile(on_owner, 99) * 1e3}
    if elsewhere:
        result.update(other_p50_ms=percentile(elsewhere, 50) * 1e3, other_p99_ms=percentile(elsewhere, 99) * 1e3)
    return result


async def executor_rate(cluster: Cluster) -> float:
    caller = cluster.replicas[0].caller
    f = (await caller.files.UploadFile(upload_requests(lines(EXECUTOR_REQUESTS, "fast-sim")),
                                       metadata=caller.metadata)).file
    started = time.perf_counter()
    batch = (await caller.batches.CreateBatch(batch_pb2.CreateBatchRequest(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
        metadata=caller.metadata)).batch
    async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                                 metadata=caller.metadata, timeout=600):
        if event.WhichOneof("event") == "batch" and event.batch.status == batch_pb2.BATCH_STATUS_COMPLETED:
            break
    return EXECUTOR_REQUESTS / (time.perf_counter() - started)


async def takeover(root: Path, backend: str, lease: float) -> float:
    async with shared_stores(backend, root / "shared") as stores:
        cluster = Cluster(root, stores, write_model_list(root / "models.yaml"), lease_timeout=lease)
        try:
            owner, other = await cluster.start(2)
            batch = await new_batch(owner.caller, 20_000)
            async for event in other.caller.batches.WatchBatch(
                    batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=other.caller.metadata, timeout=120):
                if event.WhichOneof("event") == "batch" and event.batch.request_counts.completed > 500:
                    break
            await cluster.kill(owner)
            killed = time.monotonic()
            last = None
            async for event in other.caller.batches.WatchBatch(
                    batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=other.caller.metadata, timeout=120):
                if event.WhichOneof("event") != "batch":
                    continue
                done = event.batch.request_counts.completed
                if last is not None and done > last:
                    return time.monotonic() - killed
                last = done
        finally:
            await cluster.close()
    raise RuntimeError("the batch never moved on")


async def scenario(root: Path, stores, n: int) -> dict:
    cluster = Cluster(root, stores, write_model_list(root / "models.yaml"))
    try:
        await cluster.start(n)
        batch = await new_batch(cluster.replicas[0].caller, 10)
        figures = {"get": await get_batch_load(cluster, batch.id), "watch": await watch_fan_out(cluster)}
        if n == 1:
            figures["executor_per_s"] = await executor_rate(cluster)
        return figures
    finally:
        await cluster.close()


def show(name: str, figures: dict, ceiling: float) -> None:
    g, w = figures["get"], figures["watch"]
    line = (f"{name:<26} GetBatch {g['calls_per_s']:7.0f}/s ({g['calls_per_s'] / ceiling:4.2f}x of one default"
            f" server), p50 {g['p50_ms']:5.1f} ms, p99 {g['p99_ms']:6.1f} ms | WatchBatch {w['revisions']} revisions,"
            f" owner p50/p99 {w['owner_p50_ms']:.1f}/{w['owner_p99_ms']:.1f} ms")
    if "other_p50_ms" in w:
        line += f", other replicas p50/p99 {w['other_p50_ms']:.1f}/{w['other_p99_ms']:.1f} ms"
    if "executor_per_s" in figures:
        line += f" | executor {figures['executor_per_s']:.0f} req/s"
    print(line, flush=True)


async def main(backends: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    print(f"{CALLERS} GetBatch callers for {GET_SECONDS:.0f}s; {WATCHERS} watchers on a {REQUESTS}-request batch;"
          f" machine: {os.cpu_count()} cores (shared)", flush=True)
    default = await scenario(tmp / "default", local_stores(tmp / "default"), 1)
    ceiling = default["get"]["calls_per_s"]
    show("default (no URLs), 1", default, ceiling)
    results = {"default": default}
    for backend in backends:
        for n in (1, 3):
            root = tmp / f"{backend}-{n}"
            async with shared_stores(backend, root / "shared") as stores:
                figures = await scenario(root, stores, n)
            show(f"{backend}, {n} replica(s)", figures, ceiling)
            results[f"{backend}-{n}"] = figures
        for lease in TAKEOVER_LEASES:
            seconds = await takeover(tmp / f"{backend}-takeover-{lease:g}", backend, lease)
            print(f"{backend}: kill -9 to the batch moving on at another replica, lease {lease:g}s: {seconds:.1f}s",
                  flush=True)
            results[f"{backend}-takeover-{lease:g}"] = seconds
    print(json.dumps(results))


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1:] or ["sqlite"]))
