"""GetBatch throughput and latency: 64 concurrent callers reading 100 ended batches for 5 s, and
the same while a writer creates batches (every read must see the writes before it).

The server runs as its own process; this process is the client (grpc.aio, 4 channels). The
server's CPU time per request is printed too: on a shared machine it varies far less than req/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile, start_server, stop  # noqa: E402

import grpc  # noqa: E402

from batchgate.v1 import batch_pb2, batch_pb2_grpc, file_pb2, file_pb2_grpc  # noqa: E402

CALLERS = 64
CHANNELS = 4
BATCHES = 100
SECONDS = 5.0


def upload_request(content: bytes):
    yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(filename="r.jsonl", purpose=1))
    yield file_pb2.UploadFileRequest(chunk=content)
    yield file_pb2.UploadFileRequest(finish=file_pb2.UploadFileFinish())


LINE = json.dumps({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "simulated", "messages": [{"role": "user", "content": "hi"}]}}).encode() + b"\n"


async def create_batch(files, batches) -> str:
    f = (await files.UploadFile(upload_request(LINE))).file
    return (await batches.CreateBatch(batch_pb2.CreateBatchRequest(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"))).batch.id


async def measure(port: int, pid: int, with_writer: bool) -> tuple[int, list[float], int, int, float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    files = [file_pb2_grpc.FileServiceStub(c) for c in channels]
    batches = [batch_pb2_grpc.BatchServiceStub(c) for c in channels]
    ids = [await create_batch(files[0], batches[0]) for _ in range(BATCHES)]
    latencies: list[float] = []
    cpu = cpu_seconds(pid)
    deadline = time.perf_counter() + SECONDS
    created = missed = 0

    async def caller(i: int) -> None:
        stub = batches[i % CHANNELS]
        n = i
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await stub.GetBatch(batch_pb2.GetBatchRequest(batch_id=ids[n % BATCHES]))
            latencies.append((time.perf_counter() - started) * 1000)
            n += 1

    async def writer() -> None:
        nonlocal created, missed
        while time.perf_counter() < deadline:
            try:
                batch_id = await create_batch(files[1], batches[1])
                await batches[2].GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id))
                created += 1
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                missed += 1  # a read that did not see the write just before it

    await asyncio.gather(*(caller(i) for i in range(CALLERS)), *([writer()] if with_writer else []))
    cpu = cpu_seconds(pid) - cpu
    for c in channels:
        await c.close()
    return len(latencies), latencies, created, missed, cpu


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp) / "data", env={"BATCHGATE_MASTER_KEY": ""})
        try:
            for with_writer in (False, True):
                count, latencies, created, missed, cpu = asyncio.run(measure(port, proc.pid, with_writer))
                label = f"GetBatch, {CALLERS} callers" + (f", beside a writer ({created} batches created and read back,"
                                                          f" {missed} not found right after their write)"
                                                          if with_writer else "")
                print(f"{label}: {count / SECONDS:,.0f} req/s, p50 {percentile(latencies, 50):.1f} ms,"
                      f" p99 {percentile(latencies, 99):.1f} ms; server CPU {cpu / count * 1e6:.0f} µs per read")
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
