"""Opaque, tamper-proof page tokens: a cursor bound to the listing's filter, signed by the server.

A token is base64url(payload) "." base64url(HMAC-SHA256(secret, payload)), the payload being JSON
{"f": digest of the filter, "k": cursor}. Only a token whose signature checks is ever parsed, so a
forged or garbled one cannot reach the cursor's readers (or SQLite) and is INVALID_PAGE_TOKEN.
The secret lives in the database (store.server_secret): tokens survive restarts and every
server on the same database honours the others' tokens. The filter digest is signed but checked
apart, so a genuine token replayed with another filter gets a reason of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from batchgate_server.core.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_TOKEN_LENGTH = 2048
MAX_PAGE_SIZE = 1000

R = TypeVar("R")  # a row with .created_at and .id


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", "INVALID_PAGE_SIZE",
                              violations=[FieldViolation("page_size", "must be >= 0")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def invalid_token(description: str) -> InvalidArgument:
    return InvalidArgument("page_token is not one this server issued", "INVALID_PAGE_TOKEN",
                           violations=[FieldViolation("page_token", description)])


def _filter_digest(filter_key: str) -> str:
    return hashlib.sha256(filter_key.encode()).hexdigest()[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _signature(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def seal(self, cursor: object, filter_key: str) -> str:
        """A token for any JSON-serialisable cursor, bound to `filter_key`."""
        payload = json.dumps({"f": _filter_digest(filter_key), "k": cursor}, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._signature(payload))}"

    def open(self, token: str, filter_key: str) -> object | None:
        """The cursor of a token this server issued for `filter_key`; None for no token (the first page)."""
        if not token:
            return None
        if len(token) > MAX_TOKEN_LENGTH:
            raise invalid_token("too long")
        encoded_payload, _, encoded_signature = token.partition(".")
        try:
            payload, signature = _unb64(encoded_payload), _unb64(encoded_signature)
        except (ValueError, binascii.Error):
            raise invalid_token("malformed") from None
        if not hmac.compare_digest(signature, self._signature(payload)):
            raise invalid_token("not signed by this server")
        doc = json.loads(payload)
        if doc["f"] != _filter_digest(filter_key):
            raise InvalidArgument("page_token was issued for a different filter", "PAGE_TOKEN_FILTER_MISMATCH",
                                  violations=[FieldViolation("page_token", "filter changed between pages")])
        return doc["k"]

    async def keyset_page(self, size: int, token: str, filter_key: str,
                          fetch: Callable[[int, tuple[float, str] | None], Awaitable[list[R]]]
                          ) -> tuple[list[R], str]:
        """One page of a listing ordered by the keyset (created_at, id): `fetch(limit, after)` returns
        up to `limit` rows after the cursor `after` (None: from the start). Returns the rows and the
        next page's token ("" on the last page)."""
        limit = page_size(size)
        after = _keyset(self.open(token, filter_key))
        rows = await fetch(limit + 1, after)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self.seal([rows[-1].created_at, rows[-1].id], filter_key)
        return rows, next_token


def _keyset(cursor: object) -> tuple[float, str] | None:
    if cursor is None:
        return None
    # Signed by us, so only a token of another server version could have another shape.
    if not (isinstance(cursor, list) and len(cursor) == 2 and type(cursor[0]) in (int, float)
            and type(cursor[1]) is str):
        raise invalid_token("malformed")
    return float(cursor[0]), cursor[1]
