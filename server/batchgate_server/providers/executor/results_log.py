"""Append-only result files of an executor run, safe across kill -9.

Each result line is written with one unbuffered write as soon as it arrives, so
a line is either on disk whole or (if the process died mid-write) a torn tail
that recovery truncates. Recovery also yields the custom_ids already answered,
which is how a restarted run knows what not to send again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OUTPUT_NAME = "output.jsonl"
ERROR_NAME = "errors.jsonl"


def _recover(path: Path, done: set[str]) -> int:
    """Truncate a torn last line; add every answered custom_id to `done`. Returns line count."""
    if not path.exists():
        return 0
    lines = 0
    good_end = 0
    with open(path, "r+b") as fh:
        offset = 0
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(json.loads(raw)["custom_id"])
            except (ValueError, KeyError, TypeError):
                break
            offset += len(raw)
            good_end = offset
            lines += 1
        fh.truncate(good_end)
    return lines


class ResultsLog:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.output_path = workdir / OUTPUT_NAME
        self.error_path = workdir / ERROR_NAME
        self.done: set[str] = set()
        self.completed = _recover(self.output_path, self.done)
        self.failed = _recover(self.error_path, self.done)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._out = os.open(self.output_path, flags, 0o600)
        self._err = os.open(self.error_path, flags, 0o600)

    def write_output(self, custom_id: str, line: bytes) -> None:
        os.write(self._out, line + b"\n")
        self.done.add(custom_id)
        self.completed += 1

    def write_error(self, custom_id: str, line: bytes) -> None:
        os.write(self._err, line + b"\n")
        self.done.add(custom_id)
        self.failed += 1

    def close(self) -> None:
        for fd in (self._out, self._err):
            try:
                os.close(fd)
            except OSError:
                pass
