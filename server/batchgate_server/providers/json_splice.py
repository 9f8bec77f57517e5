"""Replacing one scalar member of a JSON object line in place, without re-encoding the line.

A batch input line is mostly its prompt; the adapters change only a short member (body.model,
the url). Decoding the whole line into Python objects and encoding it again costs ~10x more than
finding the member's value in the bytes and splicing the new value in, and the splice keeps
every other byte as the caller wrote it.

Why a splice is exact: the line is first decoded (msgspec, into a struct that reads only the
members asked for) — so it is valid JSON. A match of ``"<key>"\\s*:\\s*`` ends with a colon
outside any string (inside a string every quote is escaped, so the quote before the colon is a
real closing quote, and in valid JSON such a colon follows a key): what follows is a value token
in the parse, and replacing a scalar token by another keeps the rest of the parse as it was. The
line is then decoded again and must read the new value at the member's path; the member had
another value before and every other byte is unchanged, so the replaced token was the one the
decoder reads there (for a duplicated key, the last, as Python's json reads it). Only the key's
first occurrence in the line is tried: a splice of a later one would leave an earlier duplicate as
the user wrote it, for a parser that keeps the first of duplicate keys (or refuses them) to read,
where the re-encode writes the member once. Anything else — a value that is not a scalar, a key
spelled with escapes, the key first in a nested object or duplicated — fails the check and the
caller re-encodes the line instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
# A JSON string, number or literal starting where the match starts (the value after a key's colon).
_SCALAR = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|-?[0-9][0-9.eE+-]*|null|true|false', re.DOTALL)
_KEY_PATTERNS: dict[str, re.Pattern[bytes]] = {}


def _key_pattern(key: str) -> re.Pattern[bytes]:
    pattern = _KEY_PATTERNS.get(key)
    if pattern is None:
        pattern = _KEY_PATTERNS[key] = re.compile(re.escape(_encode(key)) + rb"[ \t\r\n]*:[ \t\r\n]*")
    return pattern


def encode_value(value: Any) -> bytes | None:
    """`value` as JSON text, None when msgspec cannot write it exactly (e.g. a lone surrogate)."""
    try:
        return _encode(value)
    except (msgspec.EncodeError, TypeError, ValueError, UnicodeEncodeError):
        return None


def scalar_span(raw: bytes, key: str) -> tuple[int, int] | None:
    """(start, end) of the scalar value after the first ``"<key>":`` in `raw`, None when there is
    none or the value is an object or array (not a member this splices)."""
    match = _key_pattern(key).search(raw)
    if match is None:
        return None
    value = _SCALAR.match(raw, match.end())
    return None if value is None else (match.end(), value.end())


def splice_member(raw: bytes, key: str, new_value: bytes,
                  reads_back: Callable[[bytes], bool]) -> bytes | None:
    """`raw` with `new_value` (JSON text) in place of the scalar value of the first member named
    `key` in it, when `reads_back(line)` accepts that (it decodes the spliced line and checks that
    the member's path holds the new value; see the module docstring), else None (the caller
    re-encodes the line)."""
    span = scalar_span(raw, key)
    if span is None:
        return None
    line = raw[:span[0]] + new_value + raw[span[1]:]
    try:
        if reads_back(line):
            return line
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return None
