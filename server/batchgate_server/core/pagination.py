"""Opaque page tokens: a keyset cursor (created_at, id) bound to the listing's filter."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from batchgate_server.core.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_TOKEN_LENGTH = 2048
MAX_PAGE_SIZE = 1000

T = TypeVar("T")
R = TypeVar("R")  # a row with .created_at and .id


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", "INVALID_PAGE_SIZE",
                              violations=[FieldViolation("page_size", "must be >= 0")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _filter_digest(filter_key: str) -> str:
    return hashlib.sha256(filter_key.encode()).hexdigest()[:12]


def _seal(doc: dict, filter_key: str, **dumps_args: Any) -> str:
    raw = json.dumps({**doc, "f": _filter_digest(filter_key)}, **dumps_args).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _open(token: str, filter_key: str, read: Callable[[dict], T]) -> T | None:
    """`read(doc)` of a token's document once its filter digest matched; None for no token."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidArgument("page_token is not one this server issued", "INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token", "too long")])
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
        cursor = read(doc)
        digest = doc["f"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InvalidArgument("page_token is not one this server issued", "INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token", "malformed")]) from None
    if digest != _filter_digest(filter_key):
        raise InvalidArgument("page_token was issued for a different filter", "PAGE_TOKEN_FILTER_MISMATCH",
                              violations=[FieldViolation("page_token", "filter changed between pages")])
    return cursor


def encode_token(created_at: float, item_id: str, filter_key: str) -> str:
    return _seal({"c": created_at, "i": item_id}, filter_key)


def decode_token(token: str, filter_key: str) -> tuple[float, str] | None:
    return _open(token, filter_key, lambda doc: (float(doc["c"]), str(doc["i"])))


def encode_cursor(cursor: object, filter_key: str) -> str:
    """A token for any JSON-serialisable cursor (e.g. the group values of an aggregate)."""
    return _seal({"k": cursor}, filter_key, separators=(",", ":"))


def decode_cursor(token: str, filter_key: str) -> object | None:
    """The cursor of an encode_cursor token; None for the first page. Same errors as decode_token."""
    return _open(token, filter_key, lambda doc: doc["k"])


async def keyset_page(size: int, token: str, filter_key: str,
                      fetch: Callable[[int, tuple[float, str] | None], Awaitable[list[R]]]) -> tuple[list[R], str]:
    """One page of a listing ordered by the keyset (created_at, id): `fetch(limit, after)` returns
    up to `limit` rows after the cursor `after` (None: from the start). Returns the rows and the
    next page's token ("" on the last page)."""
    limit = page_size(size)
    after = decode_token(token, filter_key)
    rows = await fetch(limit + 1, after)
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = encode_token(rows[-1].created_at, rows[-1].id, filter_key)
    return rows, next_token
