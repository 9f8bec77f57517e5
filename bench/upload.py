"""Upload throughput and the server's memory while streaming 10/50/200 MB batch files.

Targets on the 2-core machine: >= 100 MB/s for 200 MB with validation on, RSS growth < 64 MB.
The server runs as its own process; this process is the client (1 MiB chunks).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import reset_peak, rss_kib, start_server, stop  # noqa: E402

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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        proc, port = start_server(tmp_path / "data", "--max-file-bytes", str(210 * MB))
        try:
            with BatchgateClient(f"127.0.0.1:{port}") as bg:
                print(f"{'size':>8} {'lines':>7} {'seconds':>8} {'MB/s':>8} {'server RSS growth':>18}")
                for size_mb in (10, 50, 200):
                    path = tmp_path / f"in-{size_mb}.jsonl"
                    lines = make_file(path, size_mb * MB)
                    size = path.stat().st_size
                    baseline = rss_kib(proc.pid)
                    reset_peak(proc.pid)
                    runs = []
                    for _ in range(3 if size_mb < 200 else 2):
                        started = time.perf_counter()
                        f = bg.upload_file(path, chunk_size=MB)
                        runs.append(time.perf_counter() - started)
                        assert f.line_count == lines and f.bytes == size
                        bg.delete_file(f.id)
                    peak = rss_kib(proc.pid, "VmHWM")
                    best = min(runs)
                    print(f"{size_mb:>6}MB {lines:>7} {best:>8.2f} {size / MB / best:>8.1f} "
                          f"{(peak - baseline) / 1024:>15.1f} MB")
                    path.unlink()
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
