"""Requests/s through the built-in executor against a local fake upstream, next to what wrk
drives through the same fake in the same run; and the server's peak RSS growth.

10,000 chat requests at 0 ms and 20 ms upstream latency. Targets on the 2-core machine:
>= 2,000 req/s at 0 ms, >= half of wrk's rate, RSS growth < 100 MB.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import reset_peak, rss_kib, start_server, start_upstream, stop  # noqa: E402

import yaml  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from batchgate.v1 import batch_pb2  # noqa: E402

N = 10_000
CONCURRENCY = 128
BODY = {"model": "fake-model", "max_tokens": 64,
        "messages": [{"role": "system", "content": "Classify the sentiment."},
                     {"role": "user", "content": "The delivery was late but the support team was lovely."}]}


def wrk_rate(port: int, tmp: Path) -> float | None:
    if shutil.which("wrk") is None:
        return None
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(json.dumps(BODY))}\n")
    out = subprocess.run(["wrk", "-t2", f"-c{CONCURRENCY}", "-d5s", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else None


def run_batch(latency_ms: int, tmp: Path) -> None:
    upstream, up_port = start_upstream(latency_ms)
    config = tmp / f"models-{latency_ms}.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "fake", "litellm_params": {
        "model": "hosted_vllm/fake-model", "api_base": f"http://127.0.0.1:{up_port}/v1",
        "max_concurrency": CONCURRENCY}}]}))
    server, port = start_server(tmp / f"data-{latency_ms}", "--config", str(config))
    try:
        path = tmp / "requests.jsonl"
        with open(path, "w") as fh:
            for i in range(N):
                body = dict(BODY, messages=[BODY["messages"][0], {"role": "user", "content": f"review #{i}: great"}])
                fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}) + "\n")
        with BatchgateClient(f"127.0.0.1:{port}") as bg:
            f = bg.upload_file(path)
            baseline = rss_kib(server.pid)
            reset_peak(server.pid)
            started = time.perf_counter()
            batch = bg.create_batch(f.id, "/v1/chat/completions", model="fake")
            final = bg.wait(batch.id)
            elapsed = time.perf_counter() - started
            peak = rss_kib(server.pid, "VmHWM")
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        assert final.request_counts.completed == N, final.request_counts
        rate = N / elapsed
        wrk = wrk_rate(up_port, tmp)
        wrk_text = f"{wrk:,.0f} req/s" if wrk else "wrk not installed (apt-get install wrk)"
        ratio = f" ({rate / wrk:.0%} of wrk)" if wrk else ""
        print(f"latency {latency_ms:>2} ms: executor {rate:,.0f} req/s over {N:,} requests in {elapsed:.2f}s"
              f"{ratio}; wrk -c{CONCURRENCY} on the same fake: {wrk_text}; "
              f"server RSS growth {(peak - baseline) / 1024:.1f} MB")
    finally:
        stop(server)
        upstream.terminate()
        upstream.wait()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for latency in (0, 20):
            run_batch(latency, Path(tmp))


if __name__ == "__main__":
    main()
