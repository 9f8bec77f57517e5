"""Opaque page tokens: a keyset cursor (created_at, id) bound to the listing's filter."""

from __future__ import annotations

import base64
import hashlib
import json

from batchgate_server.core.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", "INVALID_PAGE_SIZE",
                              violations=[FieldViolation("page_size", "must be >= 0")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _filter_digest(filter_key: str) -> str:
    return hashlib.sha256(filter_key.encode()).hexdigest()[:12]


def encode_token(created_at: float, item_id: str, filter_key: str) -> str:
    raw = json.dumps({"c": created_at, "i": item_id, "f": _filter_digest(filter_key)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, filter_key: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
        cursor = (float(doc["c"]), str(doc["i"]))
        digest = doc["f"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not one this server issued", "INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token", "malformed")]) from None
    if digest != _filter_digest(filter_key):
        raise InvalidArgument("page_token was issued for a different filter", "PAGE_TOKEN_FILTER_MISMATCH",
                              violations=[FieldViolation("page_token", "filter changed between pages")])
    return cursor


def encode_cursor(cursor: object, filter_key: str) -> str:
    """A token for any JSON-serialisable cursor (e.g. the group values of an aggregate)."""
    raw = json.dumps({"k": cursor, "f": _filter_digest(filter_key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, filter_key: str) -> object | None:
    """The cursor of an encode_cursor token; None for the first page. Same errors as decode_token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
        cursor = doc["k"]
        digest = doc["f"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not one this server issued", "INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token", "malformed")]) from None
    if digest != _filter_digest(filter_key):
        raise InvalidArgument("page_token was issued for a different filter", "PAGE_TOKEN_FILTER_MISMATCH",
                              violations=[FieldViolation("page_token", "filter changed between pages")])
    return cursor
