"""1,000 concurrent WatchBatch streams on one running batch: the time from a state change
(the tracker publishing a revision) to each watcher receiving it, p50/p99 and per-revision
"last watcher" latency; and provider polls per batch with 0 vs 1,000 watchers.

The server runs in this process, on uvloop like batchgate-server (so publish times can be
recorded); the watchers run in a child process so their work does not share its event loop.
Target on the 2-core machine: p99 < 100 ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import SPAWN, ClientProcesses, changes, percentile, run_loop  # noqa: E402

import grpc  # noqa: E402
import yaml  # noqa: E402

from batchgate.v1 import batch_pb2, batch_pb2_grpc, file_pb2, file_pb2_grpc  # noqa: E402

WATCHERS = 1000
CHANNELS = 10
# Watchers are spread over this many client processes: one Python process decoding a
# thousand streams is itself a bottleneck that would be counted as server latency.
WATCHER_PROCS = int(__import__("os").environ.get("WATCHER_PROCS", "2"))
REQUESTS = 1500


def watcher_process(port: int, batch_id: str, count: int, ready, results) -> None:
    async def run() -> list[tuple[int, float]]:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
        stubs = [batch_pb2_grpc.BatchServiceStub(c) for c in channels]
        count_connected = 0

        def connected() -> None:
            nonlocal count_connected
            count_connected += 1
            if count_connected == count:
                ready.set()

        async def one(i: int) -> list[tuple[int, float]]:
            stream = stubs[i % CHANNELS].WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id))
            return [seen async for seen in changes(stream, connected)]

        everything = await asyncio.gather(*[one(i) for i in range(count)])
        for c in channels:
            await c.close()
        return [item for per in everything for item in per]

    results.put(run_loop(run()))


async def main() -> None:
    from tests.conftest import start_harness

    tmp = Path(tempfile.mkdtemp())
    config = tmp / "models.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "slow-sim", "litellm_params": {
        "model": "simulated/echo", "latency_ms": 40, "max_concurrency": 16}}]}))
    h = await start_harness(tmp / "data", config_file=config, master_key="")
    published: dict[int, float] = {}
    original_publish = h.server.hub.publish

    def publish(batch):
        published.setdefault(batch.revision, time.time())
        original_publish(batch)

    h.server.hub.publish = publish
    polls = {"n": 0}
    provider = h.server.providers.get("openai_compatible")
    original_poll = provider.poll

    async def counting_poll(job):
        polls["n"] += 1
        return await original_poll(job)

    provider.poll = counting_poll

    lines = b"".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "slow-sim", "messages": [{"role": "user", "content": f"hi {i}"}]}}
                                ).encode() + b"\n" for i in range(REQUESTS))
    files = file_pb2_grpc.FileServiceStub(h.channel)
    batches = batch_pb2_grpc.BatchServiceStub(h.channel)

    def upload():
        yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(filename="w.jsonl", purpose=1))
        yield file_pb2.UploadFileRequest(chunk=lines)
        yield file_pb2.UploadFileRequest(finish=file_pb2.UploadFileFinish())

    async def run_batch(watchers: bool) -> tuple[int, float, list[tuple[int, float]]]:
        f = (await files.UploadFile(upload())).file
        polls["n"] = 0
        published.clear()
        batch = (await batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"))).batch
        readies = [SPAWN.Event() for _ in range(WATCHER_PROCS if watchers else 0)]
        procs = ClientProcesses(watcher_process, [(h.port, batch.id, WATCHERS // WATCHER_PROCS, ready)
                                                  for ready in readies])
        procs.start()
        started = time.time()
        if watchers:
            for ready in readies:
                await asyncio.to_thread(ready.wait, 60)
            connected_at["t"] = time.time()
        while True:
            got = (await batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id))).batch
            if got.status == batch_pb2.BATCH_STATUS_COMPLETED:
                break
            await asyncio.sleep(0.05)
        elapsed = time.time() - started
        received = [seen for per in await asyncio.to_thread(procs.collect) for seen in per]
        return polls["n"], elapsed, received

    connected_at = {"t": 0.0}
    polls_alone, elapsed_alone, _ = await run_batch(False)
    polls_watched, elapsed_watched, received = await run_batch(True)
    # Steady state: states published once every watcher had its first snapshot. Revisions
    # published while the thousand streams were still connecting are reported apart.
    steady = {rev for rev, t in published.items() if t >= connected_at["t"]}
    connecting = [(t - published[rev]) * 1000 for rev, t in received if rev in published and rev not in steady]
    latencies = [(t - published[rev]) * 1000 for rev, t in received if rev in steady]
    per_revision: dict[int, float] = {}
    for rev, t in received:
        if rev in steady:
            per_revision[rev] = max(per_revision.get(rev, 0.0), (t - published[rev]) * 1000)
    print(f"{WATCHERS} watchers in {WATCHER_PROCS} client process(es), {CHANNELS} channels each, "
          f"steady state: {len(latencies):,} deliveries of "
          f"{len(per_revision)} revisions")
    print(f"change -> watcher latency: p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms,"
          f" max {max(latencies):.1f} ms")
    last = list(per_revision.values())
    print(f"change -> LAST watcher per revision: p50 {percentile(last, 50):.1f} ms, p99 {percentile(last, 99):.1f} ms")
    if connecting:
        print(f"while the watchers were still connecting ({len(published) - len(steady)} revisions): "
              f"p50 {percentile(connecting, 50):.1f} ms, p99 {percentile(connecting, 99):.1f} ms")
    print(f"provider polls for the batch: {polls_alone} with no watcher ({elapsed_alone:.1f}s), "
          f"{polls_watched} with {WATCHERS} watchers ({elapsed_watched:.1f}s)")
    await h.channel.close()
    await h.server.stop(0)


if __name__ == "__main__":
    run_loop(main())
