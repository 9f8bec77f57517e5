"""A ~200 MB batch through batchgate to the fake OpenAI Batch API and its ~200 MB output back.

The server runs as a subprocess (`batchgate-server --config ...`) with a LiteLLM-format config whose
deployment points at tests/fakes/openai_batch_api.py, run in this process on its own thread with
``store_uploads=False, synthetic_output=True``: it keeps only each line's custom_id and size and
answers with output lines of the same size, generated as the output file is downloaded.

Prints, for the server process (its validation workers included):
  * upload to batchgate (UploadFile, validated as it streams)          MB/s, from an open file, as
    bench/upload.py and the ceiling's client send it: from a path the Python client first reads
    the whole file to send its sha256 in the header (its own check, printed apart: the client's
    time, not the relay's)
  * upload to the provider (streamed multipart, every line rewritten)  MB/s, as the fake received it
  * results back (provider output -> a batch_output File of ours)      MB/s, as the fake sent it
  * download from batchgate (DownloadFile)                             MB/s
  * the server's CPU per phase (ms of CPU per MB, all its processes and threads: a figure that
    moves less than MB/s on a shared machine)
  * GetBatch latency from another process while the batch goes to the provider and back (p50,
    p99, max per hop): how long the relay's CPU work stalls the event loop
  * peak RSS growth over the idle server, per phase (VmHWM, reset between phases); target < 64 MB
  * input + output MB/s through batchgate (both files' bytes over the four phases' time) against
    what a client in its own process measures in the same run, the same input uploaded straight to
    the fake provider and the same output downloaded straight from it. batchgate stores what it
    relays (the input is validated and kept before a batch exists, the output is kept for any
    number of downloads), so every byte travels twice each way: the ceiling of such a relay is the
    four transfers at the direct client's rates, and the target is >= 0.70 of that (the direct
    two-transfer rate is printed too; the issue's own target, 1.5x LiteLLM's proxy, needs LiteLLM
    beside it: bench/versus_litellm.py, outside `make bench`)

    .venv/bin/python bench/passthrough.py [--mb 200] [--lines 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cpu_seconds, family, family_rss_kib, percentile, reset_family_peak, start_server, stop  # noqa: E402

sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from batchgate._common import file_sha256  # noqa: E402
from batchgate.v1 import batch_pb2  # noqa: E402
from tests.fakes.openai_batch_api import FakeBatchAPI  # noqa: E402

KEY = "sk-bench-passthrough"
TARGET_RSS_MB = 64
TARGET_RATIO = 0.70
WORDS = ("summarise the following customer message and classify its sentiment as positive negative or "
         "neutral then list the product names it mentions with one short reason for each").split()


class FakeOnThread:
    """The fake provider on its own event loop thread (its memory is not the server's)."""

    def __init__(self, api: FakeBatchAPI) -> None:
        self.api = api
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-openai", daemon=True)

    def __enter__(self) -> FakeBatchAPI:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.api.start(), self.loop).result(timeout=30)
        return self.api

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def write_input(path: Path, total_bytes: int, lines: int) -> int:
    """`lines` chat requests of about total_bytes/lines bytes each, streamed to `path`."""
    per_line = total_bytes // lines
    text_len = max(8, per_line - len(json.dumps(line_for(0, ""))) - 1)
    corpus = " ".join(WORDS * (text_len // 40 + 200))
    with open(path, "w") as fh:
        for i in range(lines):
            start = (i * 7) % 997
            fh.write(json.dumps(line_for(i, corpus[start:start + text_len])) + "\n")
    return path.stat().st_size


def line_for(i: int, text: str) -> dict:
    return {"custom_id": f"req-{i:06d}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 256,
                     "messages": [{"role": "system", "content": "You are a precise analyst."},
                                  {"role": "user", "content": text}]}}


def direct_transfer(base_url: str, source: str, output_file_id: str) -> tuple[float, int, float, int]:
    """The ceiling, run in its own process: (seconds, bytes) of uploading `source` straight to the
    fake provider, then of downloading its output file `output_file_id` straight from it."""
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as http:
        started = time.perf_counter()
        with open(source, "rb") as fh:
            answer = http.post("/files", data={"purpose": "batch"},
                               files={"file": ("input.jsonl", fh, "application/jsonl")})
        answer.raise_for_status()
        up_s, up_bytes = time.perf_counter() - started, answer.json()["bytes"]
        started = time.perf_counter()
        down_bytes = 0
        with http.stream("GET", f"/files/{output_file_id}/content") as response:
            response.raise_for_status()
            for data in response.iter_bytes(1 << 20):
                down_bytes += len(data)
        return up_s, up_bytes, time.perf_counter() - started, down_bytes


class CpuSampler:
    """The server's CPU seconds (every process of it), sampled on a thread every 10 ms with
    time.monotonic(), the clock of the fake's phase marks, so a phase's CPU can be read after."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def now(self) -> float:
        total = 0.0
        for member in family(self.pid):
            try:
                total += cpu_seconds(member)
            except (OSError, IndexError):
                pass  # a worker that just exited
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.now()))
            self._stop.wait(0.01)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        """CPU seconds used from `start` to `end` (the nearest samples outside them)."""
        before = [cpu for t, cpu in self.samples if t <= start] or [self.samples[0][1]]
        after = [cpu for t, cpu in self.samples if t >= end] or [self.samples[-1][1]]
        return after[0] - before[-1]


def probe_get_batch(address: str, batch_id: str, seconds: float) -> list[tuple[float, float]]:
    """(time.monotonic() when sent, latency s) of back-to-back GetBatch calls for `seconds`, from a
    process of its own (the bench's own GIL, busy with the fake provider, would add its stalls)."""
    from batchgate import BatchgateClient as Client

    samples = []
    with Client(address) as client:
        client.get_batch(batch_id)
        end = time.monotonic() + seconds
        while (sent := time.monotonic()) < end:
            status = client.get_batch(batch_id).status
            samples.append((sent, time.monotonic() - sent))
            if status in ENDED:
                break
            time.sleep(0.005)
    return samples


ENDED = (batch_pb2.BATCH_STATUS_COMPLETED, batch_pb2.BATCH_STATUS_FAILED, batch_pb2.BATCH_STATUS_CANCELLED,
         batch_pb2.BATCH_STATUS_EXPIRED)


def latency_ms(samples: list[tuple[float, float]], start: float, end: float) -> str:
    during = [latency * 1000 for sent, latency in samples if start <= sent <= end]
    if not during:
        return "no calls"
    return (f"p50 {percentile(during, 50):.1f} ms, p99 {percentile(during, 99):.1f} ms, "
            f"max {max(during):.1f} ms ({len(during)} calls)")


def warm() -> None:
    """Imports the client in the pool's process before the phases are timed."""
    import batchgate  # noqa: F401


def mb(n: int | float) -> float:
    return n / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200.0, help="input size in MB (10^6 bytes)")
    ap.add_argument("--lines", type=int, default=50_000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name, \
            FakeOnThread(FakeBatchAPI(api_key=KEY, store_uploads=False, synthetic_output=True)) as fake:
        tmp = Path(tmp_name)
        source = tmp / "input.jsonl"
        t = time.perf_counter()
        size = write_input(source, int(args.mb * 1e6), args.lines)
        print(f"input: {args.lines:,} lines, {mb(size):.1f} MB (written in {time.perf_counter() - t:.1f}s)")

        config = tmp / "litellm.yaml"
        config.write_text(yaml.safe_dump({"model_list": [{
            "model_name": "gpt-4o-mini",
            "litellm_params": {"model": "openai/gpt-4o-mini-2024-07-18", "api_key": "os.environ/BENCH_OPENAI_KEY",
                               "api_base": fake.base_url, "poll_interval": 0.2, "timeout": 600},
            "model_info": {"id": "bench-openai", "mode": "batch"}}]}))
        server, port = start_server(tmp / "data", "--config", str(config), env={"BENCH_OPENAI_KEY": KEY})
        pool = multiprocessing.get_context("spawn").Pool(1)
        try:
            pool.apply(warm)
            pid = server.pid
            with BatchgateClient(f"127.0.0.1:{port}") as bg, CpuSampler(pid) as cpu:
                time.sleep(0.5)
                baseline = family_rss_kib(pid)
                peaks: dict[str, int] = {}

                reset_family_peak(pid)
                cpu_before, t = cpu.now(), time.perf_counter()
                with open(source, "rb") as fh:
                    f = bg.upload_file(fh)
                upload_s = time.perf_counter() - t
                upload_cpu = cpu.now() - cpu_before
                peaks["upload to batchgate"] = family_rss_kib(pid, "VmHWM")
                assert f.line_count == args.lines, f

                reset_family_peak(pid)
                batch = bg.create_batch(f.id, "/v1/chat/completions")
                probe = pool.apply_async(probe_get_batch, (f"127.0.0.1:{port}", batch.id, 300.0))
                final = bg.wait(batch.id)
                peaks["provider round trip"] = family_rss_kib(pid, "VmHWM")
                assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
                assert final.request_counts.completed == args.lines, final.request_counts
                get_batch_samples = probe.get(timeout=60)

                reset_family_peak(pid)
                out_path = tmp / "output.jsonl"
                cpu_before, t = cpu.now(), time.perf_counter()
                out_bytes = bg.download_file(final.output_file_id, out_path)
                download_s = time.perf_counter() - t
                download_cpu = cpu.now() - cpu_before
                peaks["download from batchgate"] = family_rss_kib(pid, "VmHWM")
        finally:
            stop(server)

        (stats,) = fake.uploads.values()
        (dl_start, dl_end, dl_bytes) = next(iter(fake.downloads.values()))
        with open(out_path, "rb") as fh:
            first = json.loads(fh.readline())
        assert stats.models == {"gpt-4o-mini-2024-07-18"} and stats.lines == args.lines and stats.chunked
        assert first["custom_id"] == "req-000000" and first["response"]["status_code"] == 200
        assert dl_bytes == out_bytes, (dl_bytes, out_bytes)

        up_s = stats.finished_at - stats.started_at
        back_s = dl_end - dl_start
        up_cpu = cpu.between(stats.started_at, stats.finished_at)
        back_cpu = cpu.between(dl_start, dl_end)

        def per_mb(cpu_s: float, n: int) -> str:
            return f"{cpu_s * 1000 / mb(n):5.1f} ms CPU/MB"

        print(f"upload to batchgate:      {mb(size) / upload_s:7.1f} MB/s  {per_mb(upload_cpu, size)}"
              f"  ({mb(size):.1f} MB in {upload_s:.2f}s)")
        started = time.perf_counter()
        file_sha256(source)
        print(f"  (from a path, the client's sha256 of the file before it sends: {time.perf_counter() - started:.2f}s more)")
        print(f"upload to the provider:   {mb(stats.bytes) / up_s:7.1f} MB/s  {per_mb(up_cpu, stats.bytes)}"
              f"  ({mb(stats.bytes):.1f} MB in {up_s:.2f}s, every line rewritten to the deployment's model)")
        print(f"results back from it:     {mb(dl_bytes) / back_s:7.1f} MB/s  {per_mb(back_cpu, dl_bytes)}"
              f"  ({mb(dl_bytes):.1f} MB in {back_s:.2f}s, into a batch_output file with usage counted)")
        print(f"download from batchgate:  {mb(out_bytes) / download_s:7.1f} MB/s  {per_mb(download_cpu, out_bytes)}"
              f"  ({mb(out_bytes):.1f} MB in {download_s:.2f}s)")
        print(f"GetBatch from another process during the upload to the provider: "
              f"{latency_ms(get_batch_samples, stats.started_at, stats.finished_at)}")
        print(f"GetBatch from another process during the results back:          "
              f"{latency_ms(get_batch_samples, dl_start, dl_end)}")
        print(f"server RSS: idle {baseline / 1024:.1f} MB; peak growth per phase: " + ", ".join(
            f"{name} {(peak - baseline) / 1024:+.1f} MB" for name, peak in peaks.items()))
        worst = max(peaks.values()) - baseline
        verdict = "OK" if worst / 1024 < TARGET_RSS_MB else "OVER TARGET"
        print(f"peak RSS growth {worst / 1024:.1f} MB (target < {TARGET_RSS_MB} MB): {verdict}")

        with pool:
            direct_up_s, direct_up, direct_down_s, direct_down = pool.apply(
                direct_transfer, (fake.base_url, str(source), final_output_file_id(fake, dl_bytes)))
        relayed = mb(size + out_bytes) / (upload_s + up_s + back_s + download_s)
        up_rate, down_rate = direct_up / direct_up_s, direct_down / direct_down_s
        ceiling = mb(direct_up + direct_down) / (direct_up_s + direct_down_s)
        # A relay that stores what it relays moves every byte twice each way: the input to it and
        # from it to the provider, the output back to it and from it to the caller. Its ceiling is
        # those four transfers at a plain client's rates, one after another.
        relay_ceiling = mb(size + out_bytes) / (2 * size / up_rate + 2 * out_bytes / down_rate)
        ratio = relayed / relay_ceiling
        print(f"input + output through batchgate: {relayed:7.1f} MB/s ({mb(size + out_bytes):.1f} MB over the four"
              f" phases, {upload_s + up_s + back_s + download_s:.2f}s)")
        print(f"straight to and from the provider: {ceiling:7.1f} MB/s (up {mb(up_rate):.1f},"
              f" down {mb(down_rate):.1f} MB/s; a client in its own process): {relayed / ceiling:.2f} of it")
        print(f"ceiling for a storing relay, the same four transfers at those rates: {relay_ceiling:7.1f} MB/s")
        print(f"  ratio {ratio:.2f} of the relay's ceiling (target >= {TARGET_RATIO:.2f}:"
              f" {'meets' if ratio >= TARGET_RATIO else 'MISSES'}; the issue's own target, >= 1.5x LiteLLM's"
              " proxy, is measured by bench/versus_litellm.py)")


def final_output_file_id(fake: FakeBatchAPI, size: int) -> str:
    """The provider's output file batchgate downloaded (the one download of `size` bytes)."""
    return next(file_id for file_id, (_, _, sent) in fake.downloads.items() if sent == size)


if __name__ == "__main__":
    main()
