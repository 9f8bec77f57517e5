"""Benchmark: price a 50,000-line OpenAI batch output file.

Writes a realistic output file (chat.completion bodies of ~1 KB, ~2% error
lines) to a temp dir, then times sum_usage_from_output + compute_cost over the
file read line by line from disk. Prints lines/s, seconds and peak RSS growth.

    .venv/bin/python bench/cost.py [--lines 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from batchgate_server.pricing import PriceTable, compute_cost, sum_usage_from_output  # noqa: E402

WORDS = ("the batch output line carries a chat completion with a usage block and some text "
         "that makes it about one kilobyte long like a real short answer would be").split()


def _line(i: int, rng: random.Random) -> bytes:
    if rng.random() < 0.02:
        return json.dumps({
            "id": f"batch_req_{i:024x}", "custom_id": f"request-{i}",
            "response": {"status_code": 400, "request_id": f"req_{i:032x}", "body": {"error": {
                "message": "Invalid 'messages[0].content': string too long.", "type": "invalid_request_error",
                "param": "messages[0].content", "code": "string_above_max_length"}}},
            "error": None}).encode() + b"\n"
    prompt = rng.randint(200, 4000)
    cached = rng.choice((0, 0, 0, 1024, 2048)) if prompt > 2048 else 0
    completion = rng.randint(20, 400)
    content = " ".join(rng.choice(WORDS) for _ in range(95))
    body = {
        "id": f"chatcmpl-{i:029x}", "object": "chat.completion", "created": 1767225600 + i,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                             "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_0ba0d124f1",
    }
    return json.dumps({"id": f"batch_req_{i:024x}", "custom_id": f"request-{i}",
                       "response": {"status_code": 200, "request_id": f"req_{i:032x}", "body": body},
                       "error": None}).encode() + b"\n"


def write_file(path: Path, n: int) -> int:
    rng = random.Random(42)
    size = 0
    with path.open("wb") as f:
        for i in range(n):
            b = _line(i, rng)
            size += len(b)
            f.write(b)
    return size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    table = PriceTable.load_builtin()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "output.jsonl"
        size = write_file(path, args.lines)
        print(f"file: {args.lines} lines, {size / 1e6:.1f} MB, {size / args.lines:.0f} B/line")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times, cpu = [], []
        cost = None
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            with path.open("rb") as f:
                usage = sum_usage_from_output(f)
            cost = compute_cost(usage, table.price_for, price_source=table.version)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best, med = min(times), statistics.median(times)
    print(f"usage: {usage}")
    print(f"cost: {cost}")
    print(f"seconds: best {best:.3f}, median {med:.3f}, worst {max(times):.3f} over {args.repeat} runs")
    print(f"cpu seconds: best {min(cpu):.3f}, median {statistics.median(cpu):.3f}")
    print(f"lines/s: {args.lines / med:,.0f} (median), {args.lines / best:,.0f} (best)")
    print(f"peak RSS growth: {(rss1 - rss0) / 1024:.1f} MiB (ru_maxrss {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB)")
    print("budget (< 1 s for 50,000 lines):", "OK" if med < 1.0 else "EXCEEDED")


if __name__ == "__main__":
    main()
