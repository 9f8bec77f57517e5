"""Upload throughput and the server's memory while streaming 10/50/200 MB batch files, local disk
beside a remote blob store (S3 on moto's server, or any --blob-url), same files, same run.
(bench/upload.py measures the upload against the machine's own ceiling.)

Targets on the 2-core machine: >= 100 MB/s for 200 MB with validation on, RSS growth < 64 MB.
The server runs as its own process; this process is the client (1 MiB chunks).

    python bench/upload_stores.py                    # local disk
    python bench/upload_stores.py --moto             # local disk, then S3 on moto's server, same files, same run
    python bench/upload_stores.py --blob-url s3://…  # local disk, then that store
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MOTO_CREDENTIALS, moto_server, new_s3_bucket, family_rss_kib, reset_family_peak, start_server, stop,
)

from batchgate import BatchgateClient  # noqa: E402

MB = 1024 * 1024


def make_file(path: Path, size: int) -> int:
    text = "Summarise the following support conversation and classify its urgency. " * 60
    lines = 0
    with open(path, "w") as fh:
        written = 0
        while written < size - 4096:
            line = json.dumps({"custom_id": f"req-{lines}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "gpt-4o-mini", "max_tokens": 200,
                                        "messages": [{"role": "system", "content": "You are a careful analyst."},
                                                     {"role": "user", "content": f"#{lines} {text}"}]}}) + "\n"
            fh.write(line)
            written += len(line)
            lines += 1
    return lines


def measure(tmp_path: Path, label: str, sizes: tuple[int, ...], *server_args: str,
            env: dict | None = None) -> dict[int, float]:
    """Upload each size through a fresh server; prints a row per size, returns MB/s by size."""
    proc, port = start_server(tmp_path / f"data-{label}", "--max-file-bytes", str(210 * MB), *server_args, env=env)
    speeds = {}
    try:
        with BatchgateClient(f"127.0.0.1:{port}") as bg:
            for size_mb in sizes:
                path = tmp_path / f"in-{size_mb}.jsonl"
                if not path.exists():
                    make_file(path, size_mb * MB)
                lines = sum(1 for _ in open(path, "rb"))
                size = path.stat().st_size
                baseline = family_rss_kib(proc.pid)
                reset_family_peak(proc.pid)
                runs = []
                for _ in range(3 if size_mb < 200 else 2):
                    started = time.perf_counter()
                    f = bg.upload_file(path, chunk_size=MB)
                    runs.append(time.perf_counter() - started)
                    assert f.line_count == lines and f.bytes == size
                    bg.delete_file(f.id)
                peak = family_rss_kib(proc.pid, "VmHWM")
                best = min(runs)
                speeds[size_mb] = size / MB / best
                print(f"{label:>6} {size_mb:>6}MB {lines:>7} {best:>8.2f} {speeds[size_mb]:>8.1f} "
                      f"{(peak - baseline) / 1024:>15.1f} MB")
    finally:
        stop(proc)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blob-url", default="", help="also upload to this blob store (s3://…, gs://…)")
    parser.add_argument("--moto", action="store_true",
                        help="start moto's S3 server and compare s3://<new bucket>/bench with local disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as cleanup:
        tmp_path = Path(tmp)
        blob_url, env = args.blob_url, {}
        if args.moto:
            endpoint = cleanup.enter_context(moto_server())
            blob_url = f"s3://{new_s3_bucket(endpoint)}/bench"
            env = {"BATCHGATE_S3_ENDPOINT_URL": endpoint, **MOTO_CREDENTIALS}
        print(f"{'store':>6} {'size':>8} {'lines':>7} {'seconds':>8} {'MB/s':>8} {'server RSS growth':>18}")
        sizes = (10, 50, 200)
        disk = measure(tmp_path, "disk", sizes)
        if blob_url:
            remote = measure(tmp_path, blob_url.split(":")[0], sizes, "--blob-url", blob_url, env=env)
            for size_mb in sizes:
                print(f"{size_mb} MB: {blob_url.split(':')[0]} at {remote[size_mb] / disk[size_mb]:.2f}x local disk")


if __name__ == "__main__":
    main()
