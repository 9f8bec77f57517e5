"""Reading what an HTTP request carries: the caller's key, query parameters, a JSON body. Whatever
is malformed is an InvalidArgument naming the parameter, as the gRPC side names fields."""

from __future__ import annotations

import json

from aiohttp import web

from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.errors import FieldViolation, InvalidArgument, echo
from batchgate_server.core.jsonl_validation import unpaired_surrogate_at

# A CreateBatch body is a few hundred bytes; 16 pairs of metadata at most 9 KiB.
MAX_JSON_BODY_BYTES = 64 * 1024


def invalid(message: str, reason: str, param: str, description: str) -> InvalidArgument:
    return InvalidArgument(message, reason, violations=[FieldViolation(param, description)])


async def authenticate(auth: Authenticator, request: web.Request) -> Principal:
    return await auth.authenticate((("authorization", request.headers.get("Authorization", "")),))


def whole_number(text: str) -> int | None:
    """`text` as a whole number of ASCII digits, None otherwise (str.isdigit also takes "²", which int()
    refuses; 20 digits are beyond any count or revision here, and int() refuses over 4300)."""
    return int(text) if 0 < len(text) <= 20 and text.isascii() and text.isdigit() else None


def query_limit(request: web.Request, default: int, most: int) -> int:
    """The `limit` query parameter: 1 to `most` (OpenAI's bounds for the listing)."""
    text = request.query.get("limit", "")
    if not text:
        return default
    value = whole_number(text)
    if value is None or not 1 <= value <= most:
        raise invalid(f"limit must be an integer from 1 to {most}, not {echo(text)}", "INVALID_LIMIT", "limit",
                      f"1 to {most}")
    return value


def query_choice(request: web.Request, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = request.query.get(name, "")
    if not value:
        return default
    if value not in choices:
        raise invalid(f"{name} must be one of {', '.join(choices)}, not {echo(value)}", f"INVALID_{name.upper()}",
                      name, f"one of {', '.join(choices)}")
    return value


async def json_object(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_JSON_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_JSON_BODY_BYTES:
            raise _too_large()
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise invalid(f"the request body is not JSON: {err}", "INVALID_JSON", "body", "a JSON object") from None
    except RecursionError:
        raise invalid("the request body nests too deeply", "INVALID_JSON", "body", "a JSON object") from None
    if not isinstance(doc, dict):
        raise invalid("the request body must be a JSON object", "INVALID_JSON", "body", "a JSON object")
    # gRPC cannot carry such a string (protobuf strings are UTF-8); JSON can, and it must not be stored.
    if (where := unpaired_surrogate_at(doc)) is not None:
        raise invalid(f'{where} holds an unpaired UTF-16 surrogate escape such as "\\ud800": valid JSON, but no'
                      " text; escape whole characters", "UNPAIRED_SURROGATE", "body", "UTF-8 text")
    return doc


def _too_large() -> InvalidArgument:
    return invalid(f"the request body exceeds {MAX_JSON_BODY_BYTES} bytes", "BODY_TOO_LARGE", "body",
                   f"at most {MAX_JSON_BODY_BYTES} bytes")


def _typed_field(doc: dict, name: str, kind: type, default, what: str):
    value = doc.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise invalid(f"{name} must be {what}", "INVALID_FIELD_TYPE", name, what)
    return value


def string_field(doc: dict, name: str, default: str = "") -> str:
    return _typed_field(doc, name, str, default, "a string")


def bool_field(doc: dict, name: str) -> bool:
    return _typed_field(doc, name, bool, False, "true or false")


def string_map(doc: dict, name: str) -> dict[str, str]:
    value = doc.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid(f"{name} must be an object of strings", "INVALID_FIELD_TYPE", name, "an object of strings")
    return value
