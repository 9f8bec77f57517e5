"""`make demo`: the whole flow on the embedded defaults — no keys, no network.

Starts batchgate-server (SQLite + local disk + the built-in executor) on a free
loopback port, uploads examples/support_tickets.jsonl, runs it as a batch on the
`simulated` model, draws a progress bar from WatchBatch, downloads the results
and prints a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from batchgate import BatchgateClient, BatchStatus

HERE = Path(__file__).resolve().parent
INPUT = HERE / "support_tickets.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int) -> subprocess.Popen:
    server_bin = Path(sys.executable).with_name("batchgate-server")
    env = {k: v for k, v in os.environ.items() if k != "BATCHGATE_MASTER_KEY"}
    proc = subprocess.Popen([str(server_bin), "--address", f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / "server.log", "wb"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        proc.kill()
        sys.exit(f"the server did not start; see {data_dir / 'server.log'}")
    finally:
        channel.close()
    return proc


def bar(done: int, total: int, width: int = 40) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def main() -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="batchgate-demo-"))
    port = free_port()
    print(f"starting batchgate-server on 127.0.0.1:{port} (data in {data_dir})")
    server = start_server(data_dir, port)
    try:
        with BatchgateClient(f"127.0.0.1:{port}") as bg:
            started = time.monotonic()
            f = bg.upload_file(INPUT)
            print(f"uploaded {f.filename}: {f.bytes:,} bytes, {f.line_count:,} requests for {f.model} "
                  f"({f.endpoint}) as {f.id}")
            batch = bg.create_batch(f.id, f.endpoint, model="simulated", metadata={"job": "ticket-triage-demo"})
            print(f"created {batch.id} on model {batch.model!r} (provider {batch.provider})")
            for state in bg.watch(batch.id):
                counts = state.request_counts
                status = str(state.status)  # a BatchStatus: prints as "in_progress"
                line = f"\r  {status:<12} {bar(counts.completed + counts.failed, counts.total or f.line_count)}"
                print(line, end="", flush=True)
            print()
            if state.status != BatchStatus.COMPLETED:
                print(f"batch ended {status}: {list(state.errors)}")
                return 1
            out = data_dir / "results.jsonl"
            bg.download_file(state.output_file_id, out)
            codes = Counter()
            first = None
            with open(out) as fh:
                for raw in fh:
                    line = json.loads(raw)
                    codes[line["response"]["status_code"]] += 1
                    first = first or line
            elapsed = time.monotonic() - started
            u = state.usage
            print(f"done in {elapsed:.1f}s: {state.request_counts.completed:,} answered, "
                  f"{state.request_counts.failed:,} failed; HTTP statuses {dict(codes)}")
            print(f"usage: {u.input_tokens:,} input + {u.output_tokens:,} output = {u.total_tokens:,} tokens; "
                  f"cost {state.cost.amount} {state.cost.currency} (simulated answers are free)")
            answer = first["response"]["body"]["choices"][0]["message"]["content"]
            print(f"first result ({first['custom_id']}): {answer[:100]}")
            print(f"results: {out} ({out.stat().st_size:,} bytes)")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        if os.environ.get("BATCHGATE_DEMO_KEEP") != "1":
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
