"""Splitting a byte stream that arrives in blocks into JSONL lines (no newline, no trailing CR,
blank lines dropped). Callers keep a `bytearray` of what is pending between blocks."""

from __future__ import annotations


def complete_lines(pending: bytearray) -> list[bytes]:
    """Take the complete lines out of `pending` (what follows the last newline stays). One copy
    of the complete part and one split: a copy and a slice per line cost ~2x more."""
    end = pending.rfind(b"\n")
    if end < 0:
        return []
    with memoryview(pending) as view:
        block = bytes(view[:end])
    del pending[:end + 1]
    return [line.rstrip(b"\r") for line in block.split(b"\n") if line.strip()]


def last_line(pending: bytearray) -> bytes | None:
    """What is left at the end of the stream (a last line without a newline), if not blank."""
    return bytes(pending).rstrip(b"\r") if pending.strip() else None
