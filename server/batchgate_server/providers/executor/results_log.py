"""Append-only result files of an executor run, safe across kill -9.

Each result line is written with one unbuffered write as soon as it arrives, so
a line is either on disk whole or (if the process died mid-write) a torn tail
that recovery truncates. Recovery also yields the custom_ids already answered,
which is how a restarted run knows what not to send again. On a full disk a write
is refused whole (see _AppendOnly): the caller keeps the line and tries again.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

from batchgate_server.providers.base import OutputUsage

OUTPUT_NAME = "output.jsonl"
ERROR_NAME = "errors.jsonl"


def _recover(path: Path, done: set[str], on_line: Callable[[dict], None] | None) -> tuple[int, int]:
    """Truncate a torn last line; add every answered custom_id to `done`, pass each line to
    `on_line`. Returns (line count, bytes kept)."""
    if not path.exists():
        return 0, 0
    lines = 0
    good_end = 0
    with open(path, "r+b") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                line = json.loads(raw)
                done.add(line["custom_id"])
            except (ValueError, KeyError, TypeError):
                break
            if on_line is not None:
                on_line(line)
            good_end += len(raw)
            lines += 1
        fh.truncate(good_end)
    return lines, good_end


class _AppendOnly:
    """One results file. A write that fails or lands short (a full disk) is rolled back to the
    last whole line, so the file never holds a torn line the process lived past."""

    def __init__(self, path: Path, end: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.end = end  # bytes of whole lines
        self._torn = False  # bytes past `end` that could not be cut yet

    def append(self, data: bytes) -> None:
        if self._torn:
            os.ftruncate(self.fd, self.end)
            self._torn = False
        try:
            written = os.write(self.fd, data)
        except OSError:
            self._cut()  # a failed write may still have put part of the line down
            raise
        if written != len(data):
            self._cut()
            raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
        self.end += written

    def _cut(self) -> None:
        try:
            os.ftruncate(self.fd, self.end)
        except OSError:
            self._torn = True  # retried before the next write

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class ResultsLog:
    """Raises OSError from a write the disk refused; nothing of that line stays, so writing it
    again later is safe."""

    def __init__(self, workdir: Path, on_error_line: Callable[[dict], None] | None = None,
                 usage: OutputUsage | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.output_path = workdir / OUTPUT_NAME
        self.error_path = workdir / ERROR_NAME
        self.done: set[str] = set()
        # The usage of exactly the output lines on disk: those recovered, then each one written.
        self.usage = usage
        self.completed, out_end = _recover(self.output_path, self.done, usage.add_parsed if usage else None)
        self.failed, err_end = _recover(self.error_path, self.done, on_error_line)
        self._out = _AppendOnly(self.output_path, out_end)
        self._err = _AppendOnly(self.error_path, err_end)

    def write_output(self, custom_id: str, line: bytes, parsed: dict) -> None:
        """`parsed`: `line` parsed (at least its response's status_code and body), for the usage."""
        self._out.append(line + b"\n")
        self.done.add(custom_id)
        self.completed += 1
        if self.usage is not None:
            self.usage.add_parsed(parsed)

    def write_error(self, custom_id: str, line: bytes) -> None:
        self._err.append(line + b"\n")
        self.done.add(custom_id)
        self.failed += 1

    @property
    def ends(self) -> tuple[int, int]:
        """Bytes of whole lines in the output and the error file."""
        return self._out.end, self._err.end

    def close(self) -> None:
        self._out.close()
        self._err.close()
