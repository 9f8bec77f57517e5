"""What handing an upload's chunks to a validation worker costs the event loop (core/upload_validation.py).

Feeds a ~200 MiB batch file in 1 MiB chunks, on uvloop, three ways:

* hand-over only: to a worker whose validator has stopped at once (max_bytes=0, so it drops every
  chunk unread): the loop's CPU per MiB is the hand-over's cost (the copy into the shared ring and its frame), the wall rate its ceiling;
* to a worker that validates: the loop's CPU per MiB beside the wall rate;
* on the loop (--upload-workers 0): the loop's CPU per MiB is the validator's.

    .venv/bin/python bench/validation_handover.py [--mib 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload import MIB, make_file  # noqa: E402

import uvloop  # noqa: E402

from batchgate_server.core.upload_validation import InlineValidation, ValidationWorkers  # noqa: E402

LIMITS = {"max_lines": 1_100_000, "max_bytes": 210 * MIB}


async def feed_all(validation, chunks: list[bytes]) -> tuple[float, float]:
    """(wall seconds, loop CPU seconds) to feed `chunks` and get the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    for chunk in chunks:
        await validation.feed(chunk)
    await validation.finish()
    return time.perf_counter() - wall, time.process_time() - cpu


async def main(mib: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.jsonl"
        make_file(path, mib * MIB, 1030)
        data = path.read_bytes()
    chunks = [data[i:i + MIB] for i in range(0, len(data), MIB)]
    size = len(data) / MIB
    workers = ValidationWorkers(1)
    try:
        await (await workers.open(LIMITS)).finish()  # started before the clock
        ways = {"hand-over only": lambda: workers.open({**LIMITS, "max_bytes": 0}),
                "to a validating worker": lambda: workers.open(LIMITS)}
        for _ in range(rounds):
            for label, opened in ways.items():
                wall, cpu = await feed_all(await opened(), chunks)
                print(f"{label:24s} {size / wall:7.0f} MiB/s wall, loop CPU {cpu * 1e6 / size:6.0f} µs per MiB")
            wall, cpu = await feed_all(InlineValidation(LIMITS), chunks)
            print(f"{'on the loop':24s} {size / wall:7.0f} MiB/s wall, loop CPU {cpu * 1e6 / size:6.0f} µs per MiB")
    finally:
        await workers.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    uvloop.run(main(args.mib, args.rounds))
