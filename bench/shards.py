"""Time to completion of one large batch spread over four deployments against the same batch on one.

A 200,000-line chat batch (issue 14) runs through the built-in executor on a model with four
deployments, each an OpenAI-compatible fake upstream (tests/fakes/openai_compatible_upstream.py, its
own process) answering after a fixed latency, each deployment capped at `max_concurrency` requests
in flight: one deployment then serves at most max_concurrency / latency requests a second (the
upstream-bound rate, the ceiling this bench compares against), four serve four times that until the
machine's CPU becomes the bound. The same uploaded file runs twice on the same server, one batch after
the other: with CreateBatch.spread unset (the router gives it one deployment) and with spread set (the
planner cuts it across the four by weight and free capacity: one shard each). Printed: both times,
their ratio, the shards the spread batch ran as, and each run's rate next to its upstream-bound
ceiling (and the executor's CPU time, which is what bounds it on a small machine).

    .venv/bin/python bench/shards.py [--lines 200000] [--latency-ms 25] [--concurrency 16]

Needs sharding (issue 14: the plan and the sharded runner) in the server and the Python client's
create_batch(spread=...). Figures from a shared machine move with its load: compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_server, start_upstream, stop  # noqa: E402

import yaml  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from batchgate.v1 import batch_pb2  # noqa: E402

DEPLOYMENTS = 4
MODEL = "fake"


def write_input(path: Path, lines: int) -> None:
    with open(path, "w") as fh:
        for i in range(lines):
            fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": MODEL, "max_tokens": 16,
                                          "messages": [{"role": "user", "content": f"review #{i}: great"}]}}))
            fh.write("\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(bg: BatchgateClient, file_id: str, server_pid: int, lines: int, *, spread: bool) -> tuple[float, object]:
    cpu = cpu_seconds(server_pid)
    started = time.perf_counter()
    batch = bg.create_batch(file_id, "/v1/chat/completions", model=MODEL, spread=spread)
    final = bg.wait(batch.id)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server_pid) - cpu
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
    assert final.request_counts.completed == lines, final.request_counts
    print(f"{'spread over ' + str(DEPLOYMENTS) if spread else 'one deployment':>15}: {elapsed:7.1f} s, "
          f"{lines / elapsed:7,.0f} req/s, server CPU {cpu:.0f} s ({cpu / elapsed:.0%} of one core)")
    return elapsed, final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--latency-ms", type=float, default=25.0)
    ap.add_argument("--concurrency", type=int, default=16, help="max_concurrency of each deployment")
    args = ap.parse_args()
    ceiling = args.concurrency * 1000 / args.latency_ms  # one deployment's upstream-bound rate, req/s

    upstreams = [start_upstream(args.latency_ms) for _ in range(DEPLOYMENTS)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "models.yaml"
        config.write_text(yaml.safe_dump({"model_list": [
            {"model_name": MODEL, "litellm_params": {"model": "hosted_vllm/fake-model",
                                                     "api_base": f"http://127.0.0.1:{port}/v1",
                                                     "max_concurrency": args.concurrency},
             "model_info": {"id": f"upstream-{n}"}}
            for n, (_, port) in enumerate(upstreams, start=1)]}))
        path = root / "requests.jsonl"
        write_input(path, args.lines)
        server, port = start_server(root / "data", "--config", str(config),
                                    "--max-file-lines", str(args.lines))
        try:
            print(f"{args.lines:,} chat requests; {DEPLOYMENTS} fake upstreams at {args.latency_ms:g} ms, "
                  f"max_concurrency {args.concurrency} each: one deployment's upstream-bound ceiling "
                  f"{ceiling:,.0f} req/s, four's {DEPLOYMENTS * ceiling:,.0f} req/s")
            with BatchgateClient(f"127.0.0.1:{port}") as bg:
                f = bg.upload_file(path)
                one, _ = run(bg, f.id, server.pid, args.lines, spread=False)
                spread, final = run(bg, f.id, server.pid, args.lines, spread=True)
            for shard in final.shards:
                print(f"    shard {shard.id} on {shard.deployment_id}: {shard.request_counts.completed:,} requests")
            assert len(final.shards) == DEPLOYMENTS, f"spread ran as {len(final.shards)} shard(s)"
            print(f"spread / one: {one / spread:.2f}x faster (ideal {DEPLOYMENTS}x while the upstreams bound it); "
                  f"one deployment at {args.lines / one / ceiling:.0%} of its ceiling, four at "
                  f"{args.lines / spread / (DEPLOYMENTS * ceiling):.0%} of theirs")
        finally:
            stop(server)
            for proc, _ in upstreams:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
