"""OpenAI batch output / error lines, as the staged and Anthropic adapters write them.

One line is `{"id", "custom_id", "response", "error"}`: an answered request has a `response`
(`{"status_code", "request_id", "body"}`) and `error` null; a request that got no answer has
`response` null and an `error` (`{"code", "message"}`). Line ids are "batch_req_" + 32 hex
digits derived from the batch id and the request's line index, so re-reading results gives the
same ids.

(The executor builds its lines by byte concatenation on its hot path and keeps its own id
scheme; see executor/run.py.)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from batchgate_server.providers.base import ResultKind, ResultLine


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (UTF-8)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (legal in JSON text): keep them as \u escapes
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def line_id(batch_id: str, request_index: int) -> str:
    """The output line id ("batch_req_…") of request `request_index` of a batch."""
    digest = hashlib.sha256(f"{batch_id}\x00{request_index}".encode("utf-8", "surrogatepass"))
    return "batch_req_" + digest.hexdigest()[:32]


def result_line(kind: ResultKind, out_id: str, custom_id: str, *, response: dict | None = None,
                error: dict | None = None) -> ResultLine:
    """The line envelope."""
    return ResultLine(kind=kind, data=dumps({"id": out_id, "custom_id": custom_id, "response": response,
                                             "error": error}))


def response_line(kind: ResultKind, out_id: str, custom_id: str, status: int, body: dict,
                  request_id: str | None = "") -> ResultLine:
    """A line with an HTTP-shaped response (`error` null)."""
    return result_line(kind, out_id, custom_id,
                       response={"status_code": status, "request_id": request_id, "body": body})


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI error response body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def no_result_line(out_id: str, custom_id: str, code: str, message: str) -> ResultLine:
    """An error-file line for a request that got no answer (cancelled, expired, lost): response
    null, `error` set."""
    return result_line(ResultKind.ERROR, out_id, custom_id, error={"code": code, "message": message})


def translation_error_line(custom_id: str, error: Any, *, request_index: int, batch_id: str,
                           request_id: str | None) -> ResultLine:
    """The error-file line (HTTP 400 shaped) for a request that was never sent because it cannot
    be translated; `error` has `.message` and `.param`."""
    return response_line(ResultKind.ERROR, line_id(batch_id, request_index), custom_id, 400,
                         error_body(error.message, "invalid_request_error", error.param,
                                    "unsupported_parameter"),
                         request_id)
