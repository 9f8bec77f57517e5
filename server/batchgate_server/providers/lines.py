"""Splitting a byte stream that arrives in blocks into JSONL lines (no newline, no trailing CR,
blank lines dropped). Callers keep a `bytearray` of what is pending between blocks."""

from __future__ import annotations


def complete_lines(pending: bytearray) -> list[bytes]:
    """Take the complete lines out of `pending` (what follows the last newline stays)."""
    lines = []
    start = 0
    while (nl := pending.find(b"\n", start)) >= 0:
        line = bytes(pending[start:nl]).rstrip(b"\r")
        start = nl + 1
        if line.strip():
            lines.append(line)
    if start:
        del pending[:start]
    return lines


def last_line(pending: bytearray) -> bytes | None:
    """What is left at the end of the stream (a last line without a newline), if not blank."""
    return bytes(pending).rstrip(b"\r") if pending.strip() else None
