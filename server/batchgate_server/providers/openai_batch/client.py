"""The I/O half of the OpenAI / Azure OpenAI batch adapters: one httpx.AsyncClient, bounded
retries with exponential backoff + jitter (honouring Retry-After), a streamed multipart upload
and a streamed line-by-line download. Translation lives in mapping.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from batchgate_server.domain.backoff import jittered_delay
from batchgate_server.providers.base import DeploymentRequests, ProviderError
from batchgate_server.providers.http_spans import provider_call, retrying
from batchgate_server.providers.lines import complete_lines, last_line

from .mapping import error_message, parse_retry_after

log = logging.getLogger(__name__)

BACKOFF_CAP = 30.0  # seconds, largest computed backoff between two attempts
MAX_INLINE_RETRY_AFTER = 60.0  # a longer Retry-After goes back to the tracker (ProviderError.retry_after)
UPLOAD_CHUNK = 256 * 1024

# Connection errors where the request certainly never reached the server: safe to retry even
# for non-idempotent calls.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Conn:
    """Where and how to call one account/resource (derived from a Deployment's params)."""

    label: str  # "OpenAI" | "Azure OpenAI": used in messages
    base_url: str  # ".../v1" (OpenAI) or ".../openai" (Azure), no trailing slash
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)  # {"api-version": ...} on Azure
    timeout: float = 60.0
    max_retries: int = 3
    backoff_base: float = 0.5
    # Whose calls these are (the job's deployment), counted in the metrics; None: not counted
    # (the health probes, which have batchgate_deployment_up).
    requests: DeploymentRequests | None = field(default=None, compare=False)

    def url(self, path: str) -> str:
        return self.base_url + path

    def httpx_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))


def backoff_delay(attempt: int, base: float, retry_after: float | None = None) -> float:
    """Delay before retry number `attempt + 1`: Retry-After when the server gave one (never
    shorter), else exponential with equal jitter, capped."""
    if retry_after is not None:
        return retry_after + random.uniform(0, min(1.0, retry_after * 0.1))
    return jittered_delay(attempt, base, BACKOFF_CAP)


_ID_SEGMENT = re.compile(r"/(batches|files)/[^/?]+")


def public_path(path: str) -> str:
    """`path` for messages that reach callers: the provider's own ids left out
    ("/batches/batch_abc/cancel" -> "/batches/{id}/cancel"); logs keep the real path."""
    return _ID_SEGMENT.sub(r"/\1/{id}", path)


# OpenAI (Bearer), Azure (api-key) and Anthropic (x-api-key), which share this client.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")


def scrub(text: str, conn: Conn) -> str:
    """`text` with the credentials of `conn` masked (a provider may echo a key back)."""
    for name, value in conn.headers.items():
        if name.lower() not in CREDENTIAL_HEADERS:
            continue
        secret = value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _status_error(conn: Conn, method: str, path: str, resp: httpx.Response, body: bytes,
                  retry_after: float | None) -> ProviderError:
    msg, code = error_message(body)
    msg = scrub(msg, conn)
    status = resp.status_code
    where = f"{conn.label} {method} {public_path(path)}"
    if status in (401, 403):
        return ProviderError(f"{where}: HTTP {status}: {msg} (check the deployment's api_key)",
                             code="provider_auth", retryable=False)
    if status == 404:
        return ProviderError(f"{where}: HTTP 404: {msg}", code="provider_not_found", retryable=False)
    if status == 429 and code in ("insufficient_quota", "billing_hard_limit_reached"):
        return ProviderError(f"{where}: HTTP 429: {msg}", code="provider_quota_exceeded",
                             retryable=False)
    if status == 429:
        return ProviderError(f"{where}: rate limited (HTTP 429): {msg}", code="provider_rate_limited",
                             retryable=True, retry_after=retry_after)
    if status >= 500 or status == 408:
        return ProviderError(f"{where}: HTTP {status}: {msg}", code="provider_unavailable",
                             retryable=True, retry_after=retry_after)
    return ProviderError(f"{where}: HTTP {status}: {msg}", code="provider_invalid_request",
                         retryable=False)


class ApiClient:
    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self._owns = client is None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._owns:
            await self._client.aclose()
            self._client = None

    async def _send(self, conn: Conn, method: str, path: str, *, stream: bool,
                    json_body: Any = None, content: Callable[[], Any] | None = None,
                    headers: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
                    idempotent: bool = True) -> httpx.Response:
        """Send with retries; returns a response with status < 400 (streamed when `stream`)."""
        attempts = max(0, conn.max_retries) + 1
        last: ProviderError | None = None
        for attempt in range(attempts):
            hdrs = dict(conn.headers)
            if headers:
                hdrs.update(headers)
            body_stream = content() if content is not None else None
            req = self.http.build_request(
                method, conn.url(path), params={**conn.query, **(params or {})}, headers=hdrs,
                json=json_body, content=body_stream, timeout=conn.httpx_timeout())
            delay_hint: float | None = None
            try:
                try:
                    with provider_call(method, public_path(path), conn.label, conn.requests) as call:
                        resp = await self.http.send(req, stream=stream)
                        call.answered(resp.status_code)
                finally:
                    if body_stream is not None and hasattr(body_stream, "aclose"):
                        await body_stream.aclose()  # release the input file on failures too
            except httpx.TransportError as e:
                last = ProviderError(f"{conn.label} {method} {public_path(path)}: network error: "
                                     f"{type(e).__name__}: {scrub(str(e), conn)}".rstrip(": "),
                                     code="provider_unreachable", retryable=True)
                if not idempotent and not isinstance(e, _NOT_SENT):
                    raise last from e  # may have reached the server: the caller reconciles
            else:
                if resp.status_code < 400:
                    return resp
                body = await resp.aread()
                await resp.aclose()
                retry_after = parse_retry_after(resp.headers)
                err = _status_error(conn, method, path, resp, body, retry_after)
                if not err.retryable:
                    raise err
                if not idempotent and resp.status_code not in (429, 502, 503, 504):
                    raise err  # a 500 on a create may have created it: the caller reconciles
                if retry_after is not None and retry_after > MAX_INLINE_RETRY_AFTER:
                    raise err  # the tracker waits (err.retry_after), not this coroutine
                last, delay_hint = err, retry_after
            if attempt + 1 >= attempts:
                break
            delay = backoff_delay(attempt, conn.backoff_base, delay_hint)
            retrying(conn.requests, call.outcome, delay)
            log.info("%s (%s); retry %d/%d in %.2fs", last.message, path, attempt + 1, attempts - 1, delay)
            await asyncio.sleep(delay)
        assert last is not None
        raise ProviderError(f"{last.message} (gave up after {attempts} attempts)", code=last.code,
                            retryable=True, retry_after=last.retry_after)

    async def request_json(self, conn: Conn, method: str, path: str, **kw: Any) -> dict:
        resp = await self._send(conn, method, path, stream=False, **kw)
        try:
            data = json.loads(resp.content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProviderError(f"{conn.label} {method} {public_path(path)}: HTTP {resp.status_code} with a "
                                f"body that is not a JSON object: {scrub(repr(resp.content[:200]), conn)}",
                                code="provider_bad_response", retryable=True)
        return data

    async def stream_lines(self, conn: Conn, path: str) -> AsyncIterator[bytes]:
        """GET `path` and yield its lines (no newline, blank lines skipped) as they arrive.
        Opening is retried; a failure mid-stream raises a retryable ProviderError."""
        resp = await self._send(conn, "GET", path, stream=True)
        pending = bytearray()
        try:
            async for chunk in resp.aiter_bytes():
                pending += chunk
                for line in complete_lines(pending):
                    yield line
            if (line := last_line(pending)) is not None:
                yield line
        except httpx.TransportError as e:
            raise ProviderError(f"{conn.label} GET {public_path(path)}: download interrupted: "
                                f"{type(e).__name__}: {e}", code="provider_unreachable",
                                retryable=True) from e
        finally:
            await resp.aclose()


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def multipart_stream(fields: Mapping[str, str], file_field: str, filename: str,
                     lines: Callable[[], AsyncIterator[bytes]]
                     ) -> tuple[str, Callable[[], AsyncIterator[bytes]]]:
    """(content type, body factory) for a multipart/form-data upload whose file part is the
    newline-joined `lines()`, streamed in ~256 KiB chunks (never the whole file in memory).
    The factory makes a fresh body per attempt."""
    async def chunks() -> AsyncIterator[bytes]:
        # Joined once per chunk: a bytearray grown line by line reallocates (and copies) as it grows.
        parts: list[bytes] = []
        size = 0
        async for line in lines():
            parts.append(line)
            size += len(line) + 1
            if size >= UPLOAD_CHUNK:
                parts.append(b"")  # the last line's newline
                yield b"\n".join(parts)
                parts.clear()
                size = 0
        if parts:
            parts.append(b"")
            yield b"\n".join(parts)

    return multipart_body(fields, file_field, filename, chunks)


def multipart_body(fields: Mapping[str, str], file_field: str, filename: str,
                   content: Callable[[], AsyncIterator[bytes]]
                   ) -> tuple[str, Callable[[], AsyncIterator[bytes]]]:
    """(content type, body factory) for a multipart/form-data upload whose file part is the
    concatenated chunks of `content()`, streamed as they come. The factory makes a fresh body per
    attempt."""
    boundary = "batchgate-" + secrets.token_hex(16)
    name = _SAFE_NAME.sub("_", filename) or "input.jsonl"
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
             f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        async with contextlib.aclosing(content()) as chunks:  # closed with the body, on failures too
            async for chunk in chunks:
                yield chunk
        yield tail

    return f"multipart/form-data; boundary={boundary}", body
