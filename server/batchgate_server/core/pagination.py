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
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from batchgate_server.core.errors import FieldViolation, InvalidArgument, echo

DEFAULT_PAGE_SIZE = 100
# A usage cursor carries the values of its page's last group (a 512-character metadata value, a
# model name): a few KiB, more only for records older than the field bounds. The signature makes
# any length harmless; this bounds the work of checking one (and stays within MAX_PAGE_BYTES' slack).
MAX_TOKEN_LENGTH = 256 * 1024
MAX_PAGE_SIZE = 1000
# A page's items stop short of this many bytes: the response stays under the 4 MiB send limit
# (app.MAX_MESSAGE_BYTES) with room for the token and the framing.
MAX_PAGE_BYTES = 3 * 1024 * 1024 + 512 * 1024
ITEM_FRAMING_BYTES = 5  # a repeated field's tag and length, per item
FETCH_ROWS = 100  # rows read at a time while a page fills: large rows are not all read for nothing

R = TypeVar("R")  # a row with .created_at and .id


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", "INVALID_PAGE_SIZE",
                              violations=[FieldViolation("page_size", "must be >= 0")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def fitting(rows: Sequence[R], weigh: Callable[[R], int], max_bytes: int, *, at_least_one: bool) -> tuple[int, int]:
    """(n, bytes): how many of the first `rows` fit in `max_bytes` of a response and what they
    weigh (`weigh(row)`: the row's serialized size). `at_least_one`: the first row goes in
    whatever it weighs, so that a page always moves on."""
    used = 0
    for n, row in enumerate(rows):
        cost = weigh(row) + ITEM_FRAMING_BYTES
        if used + cost > max_bytes and (n or not at_least_one):
            return n, used
        used += cost
    return len(rows), used


def invalid_token(description: str) -> InvalidArgument:
    return InvalidArgument("page_token is not one this server issued", "INVALID_PAGE_TOKEN",
                           violations=[FieldViolation("page_token", description)])


async def after_cursor(kind: str, after_id: str, lookup: Callable[[str], Awaitable[R | None]],
                       visible: Callable[[R], bool]) -> tuple[float, str] | None:
    """The keyset cursor of the row `after_id` names (an HTTP `after`; "": None, from the start).
    `lookup(id)`: the row or None; `visible(row)`: whether the caller may see it. Another
    project's id is refused exactly like an unknown one, so `after` cannot probe for ids."""
    if not after_id:
        return None
    record = await lookup(after_id)
    if record is None or not visible(record):
        raise InvalidArgument(f"after {echo(after_id)} is not the id of a {kind} in this listing", "INVALID_AFTER",
                              {"after": after_id}, [FieldViolation("after", f"the id of one of your {kind}s")])
    return record.created_at, record.id


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
        payload = json.dumps({"f": _filter_digest(filter_key), "k": cursor}, separators=(",", ":"),
                             ensure_ascii=False).encode()
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
                          fetch: Callable[[int, tuple[float, str] | None], Awaitable[list[R]]],
                          weigh: Callable[[R], int], max_bytes: int = MAX_PAGE_BYTES) -> tuple[list[R], str]:
        """One page of a listing ordered by the keyset (created_at, id): `fetch(limit, after)` returns
        up to `limit` rows after the cursor `after` (None: from the start). The page ends after `size`
        rows or before its rows would weigh more than `max_bytes` (`weigh(row)`: the row's size in
        the response), whichever comes first, holding at least one row so that every page moves on.
        Returns the rows and the next page's token ("" on the last page), which continues right
        after the page's last row."""
        page, more = await keyset_rows(page_size(size), _keyset(self.open(token, filter_key)), fetch, weigh,
                                       max_bytes)
        if not more:
            return page, ""
        last = page[-1]
        return page, self.seal([last.created_at, last.id], filter_key)


async def keyset_rows(limit: int, cursor: tuple[float, str] | None,
                      fetch: Callable[[int, tuple[float, str] | None], Awaitable[list[R]]],
                      weigh: Callable[[R], int], max_bytes: int = MAX_PAGE_BYTES) -> tuple[list[R], bool]:
    """Up to `limit` rows after `cursor` (see PageTokens.keyset_page), and whether the listing goes
    on after them. Shared by the gRPC pages (signed tokens) and the HTTP ones (`after` = an id)."""
    page: list[R] = []
    used = 0
    while True:
        wanted = min(limit - len(page), FETCH_ROWS)
        rows = await fetch(wanted + 1, cursor)  # one more tells whether the listing goes on
        taken, weight = fitting(rows[:wanted], weigh, max_bytes - used, at_least_one=not page)
        page += rows[:taken]
        used += weight
        if len(rows) <= taken:
            return page, False
        if taken < wanted or len(page) == limit:
            return page, True
        cursor = (page[-1].created_at, page[-1].id)


def _keyset(cursor: object) -> tuple[float, str] | None:
    if cursor is None:
        return None
    # Signed by us, so only a token of another server version could have another shape.
    if not (isinstance(cursor, list) and len(cursor) == 2 and type(cursor[0]) in (int, float)
            and type(cursor[1]) is str):
        raise invalid_token("malformed")
    return float(cursor[0]), cursor[1]
