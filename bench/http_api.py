"""The OpenAI-compatible HTTP API beside gRPC, and the HTTP server choice, measured in one run.

1. Framework ceiling (bare handlers, bench/_bare_http.py, one process each on uvloop): GET of a
   batch's JSON with 50 connections (wrk) and a 200 MB multipart upload read to the end, on aiohttp
   (its MultipartReader, as batchgate, and python-multipart's streaming parser on the raw body) and
   on Starlette/uvicorn (httptools): the raw body stream and Starlette's form parsing.
2. batchgate itself (a batchgate-server process, master key on): GetBatch with 50 concurrent
   clients over HTTP (wrk, and the same Python asyncio client as gRPC) and over gRPC; a 200 MB
   upload over HTTP (streamed multipart) and over gRPC (the client's 1 MiB chunks), with the
   server's RSS growth.

Figures are ratios to the bare aiohttp handler on the same machine in the same run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, percentile, family_rss_kib, reset_family_peak, start_server, stop, wait_port  # noqa: E402
from upload import make_file  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from batchgate.v1 import batch_pb2, batch_pb2_grpc  # noqa: E402

MB = 1024 * 1024
CONCURRENCY = 50
SECONDS = 5
RUNS = 3
KEY = "bench-master-key"
HERE = Path(__file__).resolve().parent


def wrk(url: str, headers: dict[str, str]) -> tuple[float, str, str] | None:
    """(requests/s, p50, p99) from wrk, None without wrk."""
    if shutil.which("wrk") is None:
        return None
    args = ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{SECONDS}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50, p99 = re.search(r"50%\s+(\S+)", out), re.search(r"99%\s+(\S+)", out)
    return (float(rate.group(1)), p50.group(1), p99.group(1)) if rate and p50 and p99 else None


async def _closed_loop(call) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of CONCURRENCY asyncio clients calling `call()` back to back."""
    latencies: list[float] = []
    deadline = time.perf_counter() + SECONDS

    async def client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3


async def python_http_gets(url: str) -> tuple[float, float, float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:
        async def call() -> None:
            async with http.get(url, headers=headers) as response:
                await response.read()
        return await _closed_loop(call)


async def grpc_gets(port: int, batch_id: str) -> tuple[float, float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = batch_pb2_grpc.BatchServiceStub(channel)
        request = batch_pb2.GetBatchRequest(batch_id=batch_id)
        metadata = (("authorization", f"Bearer {KEY}"),)

        async def call() -> None:
            await stub.GetBatch(request, metadata=metadata)
        return await _closed_loop(call)


async def http_upload(url: str, path: Path, headers: dict[str, str] | None = None) -> float:
    """Seconds to POST `path` as a multipart form (purpose, then the file), streamed from disk."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        with open(path, "rb") as fh:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", fh, filename=path.name, content_type="application/jsonl")
            started = time.perf_counter()
            async with http.post(url, data=form, headers=headers or {}) as response:
                assert response.status == 200, await response.text()
                await response.read()
            return time.perf_counter() - started


async def fetch_body(url: str) -> bytes:
    """The body of one authenticated GET, for the bare handlers to answer the same bytes."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {KEY}"}) as response:
            return await response.read()


def start_bare(kind: str, body_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "_bare_http.py"), kind, str(port), str(body_path)])
    wait_port(port)
    return proc, port


def measured(proc: subprocess.Popen, run) -> tuple[object, float]:
    """What `run()` returns and the server's peak RSS growth over it, in MB."""
    baseline = family_rss_kib(proc.pid)
    reset_family_peak(proc.pid)
    result = run()
    return result, (family_rss_kib(proc.pid, "VmHWM") - baseline) / 1024


def row(name: str, rate: float, p50: str, p99: str, ceiling: float) -> None:
    print(f"  {name:<44} {rate:>9,.0f} req/s  p50 {p50:>8}  p99 {p99:>8}  {rate / ceiling:>6.0%} of bare aiohttp")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        big = tmp_path / "in-200.jsonl"
        make_file(big, 200 * MB, 4400)  # lines of ~4.4 KB, as this bench measured from the start
        size = big.stat().st_size

        proc, port = start_server(tmp_path / "data", "--max-file-bytes", str(210 * MB), "--http-address",
                                  f"127.0.0.1:{(http_port := free_port())}", env={"BATCHGATE_MASTER_KEY": KEY})
        try:
            wait_port(http_port)
            with BatchgateClient(f"127.0.0.1:{port}", api_key=KEY) as bg:
                small = tmp_path / "small.jsonl"
                make_file(small, 64 * 1024, 4400)
                batch = bg.create_batch(bg.upload_file(small).id, "/v1/chat/completions", model="simulated")
            batch_url = f"http://127.0.0.1:{http_port}/v1/batches/{batch.id}"
            body_path = tmp_path / "batch.json"
            body_path.write_bytes(asyncio.run(fetch_body(batch_url)))

            bare: dict[str, tuple | None] = {}
            uploads: dict[str, list[tuple[float, float]]] = {}
            for _ in range(RUNS):  # interleaved: load from the rest of the machine hits each alike
                for kind in ("aiohttp", "aiohttp-pm", "starlette", "starlette-form"):
                    bare_proc, bare_port = start_bare(kind, body_path)
                    try:
                        if kind in ("aiohttp", "starlette") and kind not in bare:
                            bare[kind] = wrk(f"http://127.0.0.1:{bare_port}/batch", {})
                        uploads.setdefault(kind, []).append(measured(bare_proc, lambda: asyncio.run(
                            http_upload(f"http://127.0.0.1:{bare_port}/upload", big))))
                    finally:
                        stop(bare_proc)

            auth = {"Authorization": f"Bearer {KEY}"}
            http_wrk = wrk(batch_url, auth)
            http_python = asyncio.run(python_http_gets(batch_url))
            grpc_python = asyncio.run(grpc_gets(port, batch.id))
            with BatchgateClient(f"127.0.0.1:{port}", api_key=KEY) as bg:
                def grpc_upload() -> float:
                    started = time.perf_counter()
                    f = bg.upload_file(big, chunk_size=MB)
                    assert f.bytes == size
                    return time.perf_counter() - started
                for _ in range(RUNS):
                    uploads.setdefault("http", []).append(measured(proc, lambda: asyncio.run(
                        http_upload(f"http://127.0.0.1:{http_port}/v1/files", big, auth))))
                    uploads.setdefault("grpc", []).append(measured(proc, grpc_upload))
        finally:
            stop(proc)

        print(f"GET one batch ({len(body_path.read_bytes())} bytes of JSON), {CONCURRENCY} concurrent clients, "
              f"{SECONDS} s each; {os.cpu_count()} cores shared by client and server")
        if bare.get("aiohttp") is None:
            print("  (wrk not installed: no wrk figures; apt-get install wrk)")
        else:
            ceiling = bare["aiohttp"][0]
            row("bare aiohttp handler (wrk) — the ceiling", *bare["aiohttp"], ceiling)
            row("bare Starlette on uvicorn+httptools (wrk)", *bare["starlette"], ceiling)
            row("batchgate HTTP GET /v1/batches/{id} (wrk)", *http_wrk, ceiling)
            row("batchgate HTTP, Python aiohttp clients", http_python[0], f"{http_python[1]:.1f}ms",
                f"{http_python[2]:.1f}ms", ceiling)
            row("batchgate gRPC GetBatch, Python grpc.aio clients", grpc_python[0], f"{grpc_python[1]:.1f}ms",
                f"{grpc_python[2]:.1f}ms", ceiling)
        print(f"\nUpload of {size / MB:.0f} MB, best of {RUNS} (server RSS growth: the most of any run)")
        best = {kind: (min(s for s, _ in runs), max(g for _, g in runs)) for kind, runs in uploads.items()}
        ceiling = size / MB / best["aiohttp"][0]
        for name, (seconds, growth) in [("bare aiohttp MultipartReader — the ceiling", best["aiohttp"]),
                                        ("bare aiohttp + python-multipart's parser", best["aiohttp-pm"]),
                                        ("bare Starlette, raw body stream (no parsing)", best["starlette"]),
                                        ("bare Starlette, request.form() (spools to disk)", best["starlette-form"]),
                                        ("batchgate HTTP POST /v1/files (validated)", best["http"]),
                                        ("batchgate gRPC UploadFile (validated)", best["grpc"])]:
            rate = size / MB / seconds
            print(f"  {name:<48} {rate:>7.1f} MB/s  RSS +{growth:>6.1f} MB  {rate / ceiling:>6.0%} of bare aiohttp")


if __name__ == "__main__":
    main()
