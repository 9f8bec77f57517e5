"""The split of a sharded batch (core/sharded.py): time and memory of its one pass over the input.

A 200,000-line file on the local blob store, split as the parent's runner splits it: each line's
group, its part, its size as the provider will receive it (OpenAI: the line itself; Anthropic: its
Messages translation), then the cut into jobs. Two files: one group (lines are only counted) and
mixed chat + embeddings (each line's url and body.model decoded). The ceiling, measured in the same
run on the same file: reading its lines and nothing else (BlobStore.lines, how every provider
reads a batch's input). Memory: the tracemalloc peak of the pass, against the file's size. The
event loop's share: while the split runs, a probe sleeps PROBE_INTERVAL at a time and records how
late each wake-up is; the longest is the longest stall every other RPC (a GetBatch) sees.

    .venv/bin/python bench/shard_split.py [--lines 200000]

Figures from a shared machine move with its load: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from batchgate_server.core.sharded import Measured, cut, measure_parts  # noqa: E402
from batchgate_server.domain.deployment import Deployment  # noqa: E402
from batchgate_server.domain.shards import PlannedPart  # noqa: E402
from batchgate_server.providers.anthropic.provider import AnthropicBatchProvider  # noqa: E402
from batchgate_server.providers.openai_batch import OpenAIBatchProvider  # noqa: E402
from batchgate_server.store.blobs.local import LocalBlobStore  # noqa: E402

CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"


def line(i: int, mixed: bool) -> bytes:
    if mixed and i % 4 == 0:
        body = {"model": "text-embedding-3-small", "input": f"passage number {i} " * 8}
        url = EMBED
    else:
        body = {"model": "gpt-4o-mini", "max_tokens": 64,
                "messages": [{"role": "user", "content": f"Question number {i}: " + "lorem ipsum " * 12}]}
        url = CHAT
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}).encode() + b"\n"


async def store_file(blobs: LocalBlobStore, key: str, n: int, mixed: bool) -> int:
    writer = blobs.open_writer()
    size, block = 0, bytearray()
    for i in range(n):
        block += line(i, mixed)
        if len(block) > 1 << 20:
            size += len(block)
            await writer.write(bytes(block))
            block.clear()
    size += len(block)
    await writer.write(bytes(block))
    await writer.commit(key)
    return size


def parts(n: int, mixed: bool, provider, deployment: Deployment) -> list[Measured]:
    if not mixed:
        return [Measured(PlannedPart(CHAT, "gpt-4o-mini", deployment.id, 0, n), deployment, provider)]
    embeds = (n + 3) // 4
    return [Measured(PlannedPart(CHAT, "gpt-4o-mini", deployment.id, 0, n - embeds), deployment, provider),
            Measured(PlannedPart(EMBED, "text-embedding-3-small", deployment.id, 0, embeds), deployment, provider)]


async def read_only(blobs: LocalBlobStore, key: str) -> float:
    started = time.perf_counter()
    async for _ in blobs.lines(key):
        pass
    return time.perf_counter() - started


PROBE_INTERVAL = 0.005  # seconds


async def loop_stalls(done: asyncio.Event) -> list[float]:
    """How late each PROBE_INTERVAL wake-up came until `done`: what the loop owes everyone else."""
    late = []
    while not done.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(PROBE_INTERVAL)
        late.append(time.perf_counter() - asked - PROBE_INTERVAL)
    return late


async def split(blobs: LocalBlobStore, key: str, measured: list[Measured], mixed: bool) -> tuple[float, int]:
    started = time.perf_counter()
    await measure_parts(blobs, key, measured, single_group=not mixed)
    jobs = [cut(m.sizes, m.provider.limits(m.part.endpoint, m.deployment), "part") for m in measured]
    return time.perf_counter() - started, sum(len(j) for j in jobs)


async def split_probed(blobs: LocalBlobStore, key: str, measured: list[Measured], mixed: bool
                       ) -> tuple[float, int, float, float]:
    """split() with the loop probe beside it: (seconds, jobs, longest stall, median stall)."""
    done = asyncio.Event()
    probe = asyncio.create_task(loop_stalls(done))
    try:
        took, jobs = await split(blobs, key, measured, mixed)
    finally:
        done.set()
    late = sorted(await probe) or [0.0]
    return took, jobs, late[-1], late[len(late) // 2]


async def split_peak(blobs: LocalBlobStore, key: str, measured: list[Measured], mixed: bool) -> int:
    """Bytes allocated at the peak of a split (a run of its own: tracemalloc slows every allocation)."""
    tracemalloc.start()
    await split(blobs, key, measured, mixed)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000)
    n = ap.parse_args().lines
    with tempfile.TemporaryDirectory() as tmp:
        blobs = await LocalBlobStore.open(Path(tmp))
        cases = [("OpenAI, one group", OpenAIBatchProvider(), "openai", False),
                 ("OpenAI, mixed chat + embeddings", OpenAIBatchProvider(), "openai", True),
                 ("Anthropic (translated sizes), one group", AnthropicBatchProvider(), "anthropic", False)]
        print(f"{n:,} lines; ceiling: the same file's lines read and nothing else")
        for name, provider, kind, mixed in cases:
            key = f"file-{kind}-{int(mixed)}"
            size = await store_file(blobs, key, n, mixed)
            deployment = Deployment(id=f"bench-{kind}", model_name="m", provider=kind, model="claude-3-5-haiku"
                                    if kind == "anthropic" else "gpt-4o-mini", params={"api_key": "x"})
            ceiling = min([await read_only(blobs, key) for _ in range(2)])
            took, jobs, longest, median = await split_probed(blobs, key, parts(n, mixed, provider, deployment),
                                                             mixed)
            peak = await split_peak(blobs, key, parts(n, mixed, provider, deployment), mixed)
            print(f"  {name:<42} {took:6.2f} s ({n / took:9,.0f} lines/s), {took / ceiling:5.1f}x the read "
                  f"({ceiling:.2f} s); peak {peak / 2**20:5.1f} MiB for a {size / 2**20:.0f} MiB file "
                  f"({peak / n:.0f} B/line); {jobs} jobs; loop stalls: longest {longest * 1000:.0f} ms, "
                  f"median {median * 1000:.1f} ms")
        await blobs.close()


if __name__ == "__main__":
    asyncio.run(main())
