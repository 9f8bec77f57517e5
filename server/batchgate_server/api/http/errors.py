"""Domain errors in OpenAI's error shape, with the HTTP status OpenAI's API would answer.

    {"error": {"message": …, "type": "invalid_request_error", "param": "purpose",
               "code": "invalid_purpose", "line": null,
               "batchgate": {"reason": "INVALID_PURPOSE", "metadata": {…}, "violations": [{"field", "description"}]}}}

`code` is the reason in lower case (OpenAI's own codes read the same: INVALID_API_KEY is
"invalid_api_key"); the exact reason, its metadata and every field violation travel under
`batchgate`. Only a bug is a 500 (logged with its traceback).
"""

from __future__ import annotations

import json
import logging
import math

from aiohttp import web

from batchgate_server.core import errors

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[errors.ApiError], int]] = [
    (errors.InvalidArgument, 400),
    (errors.Unauthenticated, 401),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.DeadlineExceeded, 408),
    (errors.FailedPrecondition, 409),
    (errors.ResourceExhausted, 429),
    (errors.Unavailable, 503),
]
# Reasons with a status of their own: size limits are OpenAI's 413.
_STATUS_BY_REASON = {"FILE_TOO_LARGE": 413, "BODY_TOO_LARGE": 413}
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                   500: "server_error"}
# The SDKs retry 408, 409, 429 and 5xx unless told not to: a conflict (a file in use, a batch that
# has ended, a reused request_id) does not go away by asking again.
_NO_RETRY = {409}

CLIENT_CLOSED_REQUEST = 499  # nginx's name for it: never sent, the connection is gone
# What the router's and Range's own errors say in their headers.
_KEPT_HEADERS = {"Allow", "Content-Range"}

# Bounds on what an error echoes back (an error answers a hostile request too).
MAX_MESSAGE_BYTES = 2048
MAX_VIOLATIONS = 20
MAX_VIOLATION_BYTES = 512
MAX_METADATA_VALUE_BYTES = 512
# The gRPC upload header's fields are plain form fields here.
_HEADER_PREFIX = "header."


def status_of(err: errors.ApiError) -> int:
    return _STATUS_BY_REASON.get(err.reason) or next(status for cls, status in _STATUS if isinstance(err, cls))


def _param(field: str) -> str:
    return field.removeprefix(_HEADER_PREFIX)


def error_body(status: int, message: str, code: str, *, param: str | None = None, line: int | None = None,
               batchgate: dict | None = None) -> dict:
    error = {"message": errors.clip(message, MAX_MESSAGE_BYTES), "type": _TYPE_BY_STATUS.get(
        status, "invalid_request_error"), "param": param, "code": code, "line": line}
    if batchgate is not None:
        error["batchgate"] = batchgate
    return {"error": error}


def _line(err: errors.ApiError) -> int | None:
    line = err.metadata.get("first_line", "")  # set by the core (validation_error): digits
    return int(line) if line.isascii() and line.isdigit() and int(line) > 0 else None


def _error_of(err: errors.ApiError) -> dict:
    """The OpenAI error body of `err`."""
    status = status_of(err)
    violations = [{"field": _param(v.field), "description": errors.clip(v.description, MAX_VIOLATION_BYTES)}
                  for v in err.violations[:MAX_VIOLATIONS]]
    extra = {"reason": err.reason, "violations": violations,
             "metadata": {k: errors.clip(v, MAX_METADATA_VALUE_BYTES) for k, v in err.metadata.items()}}
    if len(err.violations) > MAX_VIOLATIONS:
        extra["omitted_violations"] = len(err.violations) - MAX_VIOLATIONS
    return error_body(status, err.message, err.reason.lower(), param=violations[0]["field"] if violations else None,
                      line=_line(err), batchgate=extra)


def to_response(err: errors.ApiError) -> web.Response:
    status = status_of(err)
    headers = {}
    if isinstance(err, errors.RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if status in _NO_RETRY:
        headers["x-should-retry"] = "false"
    return json_response(_error_of(err), status, headers)


def json_bytes(doc: object) -> bytes:
    """`doc` as JSON in UTF-8. Every string in it is text: JSON bodies with surrogates are refused,
    the core refuses them in header-borne fields (is_utf8_text), SQLite could not store them,
    aiohttp decodes URLs with replacement characters, and errors echo values through repr."""
    return json.dumps(doc, ensure_ascii=False).encode()


def json_response(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json_bytes(body), status=status, headers=headers, content_type="application/json")


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every answer that is not a success in OpenAI's error shape: domain errors, the router's own
    (no such path, a method the path does not take, a JSON body over the size limit) and bugs."""
    try:
        return await handler(request)
    except errors.ApiError as err:
        return to_response(err)
    except errors.StorageError as err:
        mapped = errors.from_storage(err)
        if mapped is None:
            raise
        return to_response(mapped)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        message = {404: f"no route for {request.method} {request.path}",
                   405: f"{request.path} does not take {request.method}"}.get(exc.status, exc.reason)
        return json_response(error_body(exc.status, message, code), exc.status,
                             {k: v for k, v in exc.headers.items() if k in _KEPT_HEADERS})
    except ConnectionResetError:
        # The client went away mid-upload or mid-download: no bug, and nobody to read an answer
        # (aiohttp drops it quietly; raised on, it would log the disconnection as an error).
        log.info("HTTP %s %s: the client went away", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return json_response(error_body(500, "internal error; the server logged it", "internal_error"), 500)
