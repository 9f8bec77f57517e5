"""Shared benchmark plumbing: free ports, subprocess servers, RSS readings, percentiles, client
processes, the event loop, WatchBatch change streams."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found")


def reset_peak(pid: int) -> None:
    """Linux resets VmHWM to the current RSS when 5 is written to clear_refs."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_seconds_and_faults(pid: int) -> tuple[float, int]:
    """System CPU seconds and minor page faults of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def family(pid: int) -> list[int]:
    """`pid` and its descendants (a server's validation workers), from /proc."""
    pids = [pid]
    for member in pids:
        for task in Path(f"/proc/{member}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids.extend(int(child) for child in task.read_text().split())
    return pids


def family_rss_kib(pid: int, field: str = "VmRSS") -> int:
    """The RSS (or VmHWM) of `pid` and its descendants, summed: a peak is each one's own peak."""
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_kib(member, field)
    return total


def reset_family_peak(pid: int) -> None:
    for member in family(pid):
        reset_peak(member)


def start_server(data_dir: Path, *extra: str, env: dict | None = None,
                 command: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    """`command`: what runs the server (default: the batchgate-server script)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*(command or [str(BIN / "batchgate-server")]), "--address", f"127.0.0.1:{port}", "--data-dir",
                             str(data_dir), "--log-level", "WARNING", *extra],
                            env={**os.environ, **(env or {})})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    channel.close()
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_upstream(latency_ms: float) -> tuple[subprocess.Popen, int]:
    """tests/fakes/openai_compatible_upstream.py in its own process, answering after `latency_ms`."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_compatible_upstream", "--port", str(port),
                             "--latency-ms", str(latency_ms)], cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def wait_http(url: str, seconds: float = 30) -> None:
    """Until something answers HTTP at `url`."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.1)


MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def emulator(*command: str, port_flag: str = "--port") -> Iterator[str]:
    """An emulator's command (from the venv's bin) in its own process on a free port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / command[0]), *command[1:], port_flag, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield url
    finally:
        stop(proc)


def moto_server() -> contextlib.AbstractContextManager[str]:
    return emulator("moto_server", port_flag="-p")


def new_s3_bucket(endpoint: str) -> str:
    import uuid

    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket=bucket)
    return bucket


def run_loop(coro):
    """Run `coro` on uvloop, as batchgate-server itself runs (see cli.run)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# Client processes are spawned: a fresh interpreter each, no event loop or gRPC state inherited.
SPAWN = multiprocessing.get_context("spawn")


class ClientProcesses:
    """Load spread over client processes, so one Python process's own work (decoding a thousand
    streams, driving hundreds of clients) is not counted as the server's. `target(*args, results)`
    runs in each and puts exactly one result on `results`."""

    def __init__(self, target: Callable[..., None], per_process: list[tuple]) -> None:
        self._results = SPAWN.Queue()
        self._procs = [SPAWN.Process(target=target, args=(*args, self._results)) for args in per_process]

    def start(self) -> None:
        for proc in self._procs:
            proc.start()

    def collect(self, timeout: float | None = None) -> list:
        """One result per process, in the order they come; None for a process that gave none within
        `timeout` seconds (it is killed)."""
        got = []
        for _ in self._procs:
            try:
                got.append(self._results.get(timeout=timeout))
            except queue.Empty:
                got.append(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        return got


async def changes(stream, connected: Callable[[], None]) -> AsyncIterator[tuple[int, float]]:
    """(revision, time.time() at arrival) of each Batch a WatchBatch stream brings after the first,
    heartbeats skipped. The first is the snapshot, not a change: `connected()` is called instead."""
    first = True
    async for event in stream:
        if event.WhichOneof("event") != "batch":
            continue
        if first:
            first = False
            connected()
            continue
        yield event.batch.revision, time.time()
