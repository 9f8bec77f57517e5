"""Requests/s through the built-in executor against a local fake upstream, next to what wrk
drives through the same fake in the same run (the ceiling: the mean of a wrk run right before and
one right after the batch); and the server's peak RSS growth.

10,000 chat requests at 0 ms and 20 ms upstream latency, 128 in flight (the executor's
max_concurrency and wrk's connections). The executor's rate is end to end: CreateBatch until the
batch is completed with its output file stored. Targets (issue 11), on the 2-core machine:

* >= 50% of wrk's rate at 0 ms, >= 90% at 20 ms;
* server RSS growth < 32 MiB for the 10,000 requests.

    .venv/bin/python bench/executor.py [--rounds 3] [--profile DIR]

--rounds interleaves the two latencies that many times and prints each round and the range.
The server's CPU per request (all its threads, CreateBatch to completed) is printed too: on a
shared machine it moves less than the rates do; a batch of one request end to end (before the
big one, on the same server): the fixed part of every batch (pickup, one upstream answer, finish);
and the fake's own CPU per request under wrk and under the executor (the fake, one process on one
core, is what bounds both at 20 ms: when the executor's server takes CPU the fake needs, the ratio
falls without the executor doing anything slower).
--profile DIR records the server during each batch with py-spy (pip install py-spy) into
DIR/executor-<latency>ms-<round>.txt (collapsed stacks).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, reset_peak, rss_kib, start_server, start_upstream, stop  # noqa: E402

import yaml  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from batchgate.v1 import batch_pb2  # noqa: E402

N = 10_000
CONCURRENCY = 128
LATENCIES = (0, 20)
TARGET_RATIO = {0: 0.50, 20: 0.90}
TARGET_RSS_MIB = 32
BODY = {"model": "fake-model", "max_tokens": 64,
        "messages": [{"role": "system", "content": "Classify the sentiment."},
                     {"role": "user", "content": "The delivery was late but the support team was lovely."}]}


def wrk_rate(port: int, tmp: Path) -> float | None:
    if shutil.which("wrk") is None:
        return None
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(json.dumps(BODY))}\n")
    out = subprocess.run(["wrk", "-t2", f"-c{CONCURRENCY}", "-d4s", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else None


def write_requests(path: Path) -> None:
    with open(path, "w") as fh:
        for i in range(N):
            body = dict(BODY, messages=[BODY["messages"][0], {"role": "user", "content": f"review #{i}: great"}])
            fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}) + "\n")


class FakeCpu:
    """The fake upstream's CPU per request it served since the last `per_request()`: the same
    fake serves wrk and the executor, so this says whether it worked as hard for each."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self._pid, self._port = proc.pid, port
        self._last = self._now()

    def _now(self) -> tuple[float, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self._port}/_fake/stats") as resp:
            served = json.load(resp)["requests_total"]
        return cpu_seconds(self._pid), served

    def per_request(self) -> float:
        (cpu0, n0), (cpu1, n1) = self._last, self._now()
        self._last = (cpu1, n1)
        return (cpu1 - cpu0) / max(1, n1 - n0) * 1e6


def one_request_ms(bg: BatchgateClient, tmp: Path) -> float:
    """A batch of one request, CreateBatch until completed: the fixed part of every batch (the
    pickup, the upstream's latency once, the finish), which the 10,000-request rate includes."""
    single = tmp / "one-request.jsonl"
    if not single.exists():
        single.write_text(json.dumps({"custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
                                      "body": BODY}) + "\n")
    f = bg.upload_file(single)
    started = time.perf_counter()
    final = bg.wait(bg.create_batch(f.id, "/v1/chat/completions", model="fake").id)
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
    return (time.perf_counter() - started) * 1000


def run_batch(latency_ms: int, tmp: Path, requests: Path, profile: Path | None, label: str) -> dict:
    upstream, up_port = start_upstream(latency_ms)
    config = tmp / f"models-{label}.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "fake", "litellm_params": {
        "model": "hosted_vllm/fake-model", "api_base": f"http://127.0.0.1:{up_port}/v1",
        "max_concurrency": CONCURRENCY}}]}))
    server, port = start_server(tmp / f"data-{label}", "--config", str(config))
    spy = None
    try:
        with BatchgateClient(f"127.0.0.1:{port}") as bg:
            one_ms = one_request_ms(bg, tmp)
            f = bg.upload_file(requests)
            baseline = rss_kib(server.pid)
            reset_peak(server.pid)
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-r", "100", "-f", "raw",
                                        "-o", str(profile / f"executor-{label}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)  # py-spy attaches
            # The ceiling is measured right before and right after the batch and averaged: the
            # machine is shared, and its load drifts within seconds.
            fake = FakeCpu(upstream, up_port)
            wrk_before = wrk_rate(up_port, tmp)
            fake_wrk = fake.per_request()
            cpu_before = cpu_seconds(server.pid)
            started = time.perf_counter()
            batch = bg.create_batch(f.id, "/v1/chat/completions", model="fake")
            final = bg.wait(batch.id)
            elapsed = time.perf_counter() - started
            peak = rss_kib(server.pid, "VmHWM")
            cpu = cpu_seconds(server.pid) - cpu_before
            fake_executor = fake.per_request()
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        assert final.request_counts.completed == N, final.request_counts
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
        wrk_after = wrk_rate(up_port, tmp)
        wrk = (wrk_before + wrk_after) / 2 if wrk_before and wrk_after else None
        return {"rate": N / elapsed, "elapsed": elapsed, "wrk": wrk,
                "rss_mib": (peak - baseline) / 1024, "cpu_us": cpu / N * 1e6, "one_ms": one_ms,
                "fake_us": (fake_wrk, fake_executor)}
    finally:
        stop(server)
        upstream.terminate()
        upstream.wait()


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="record the server with py-spy into this directory")
    args = parser.parse_args()
    results: dict[int, list[dict]] = {latency: [] for latency in LATENCIES}
    with tempfile.TemporaryDirectory() as tmp:
        requests = Path(tmp) / "requests.jsonl"
        write_requests(requests)
        for round_no in range(1, args.rounds + 1):
            for latency in LATENCIES:
                r = run_batch(latency, Path(tmp), requests, args.profile, f"{latency}ms-{round_no}")
                results[latency].append(r)
                if r["wrk"]:
                    ratio = r["rate"] / r["wrk"]
                    vs_wrk = (f"{ratio:.0%} of wrk's {r['wrk']:,.0f} req/s on the same fake (target >= "
                              f"{TARGET_RATIO[latency]:.0%}: {verdict(ratio >= TARGET_RATIO[latency])})")
                else:
                    vs_wrk = "wrk not installed (apt-get install wrk): no ceiling"
                print(f"round {round_no}, latency {latency:>2} ms: executor {r['rate']:,.0f} req/s over {N:,} "
                      f"requests in {r['elapsed']:.2f}s ({r['cpu_us']:.0f} us of server CPU each), {vs_wrk}; server RSS growth {r['rss_mib']:.1f} MiB "
                      f"(target < {TARGET_RSS_MIB}: {verdict(r['rss_mib'] < TARGET_RSS_MIB)}); a batch of 1 request "
                      f"{r['one_ms']:.0f} ms end to end (fixed part); the fake's CPU per request {r['fake_us'][0]:.0f} us "
                      f"under wrk, {r['fake_us'][1]:.0f} us under the executor", flush=True)
    if args.rounds > 1:
        for latency, runs in results.items():
            rates = [r["rate"] for r in runs]
            ratios = [r["rate"] / r["wrk"] for r in runs if r["wrk"]]
            rss = [r["rss_mib"] for r in runs]
            one = [r["one_ms"] for r in runs]
            ratio_text = (f", {min(ratios):.0%}-{max(ratios):.0%} of wrk (target >= {TARGET_RATIO[latency]:.0%})"
                          if ratios else "")
            print(f"latency {latency:>2} ms over {len(runs)} rounds: {min(rates):,.0f}-{max(rates):,.0f} req/s"
                  f"{ratio_text}; RSS growth {min(rss):.1f}-{max(rss):.1f} MiB (target < {TARGET_RSS_MIB}); "
                  f"a batch of 1 request {min(one):.0f}-{max(one):.0f} ms")


if __name__ == "__main__":
    main()
