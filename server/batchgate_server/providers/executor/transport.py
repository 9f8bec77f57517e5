"""HTTP transport to an OpenAI-compatible server.

The executor's whole job is request throughput, and its cost is the client's CPU per request.
Requests go through http1.py, the executor's own HTTP/1.1 client (40-48 us of CPU per request
against a local fake at 128 in flight, on this 2-core machine), not a general client library:
pyreqwest (Rust's reqwest/hyper) 88-100 us, aiohttp 150-180, aiosonic 130-135; httpx sustains
about a twentieth of aiohttp's rate. An upstream reached through a proxy (HTTP_PROXY,
HTTPS_PROXY or ALL_PROXY, unless NO_PROXY names it) goes through pyreqwest, which speaks to
proxies; http1.py does not. (The remote batch APIs, with few large calls, use httpx.)
"""

from __future__ import annotations

import asyncio
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import ConnectError, PyreqwestError, RequestTimeoutError

from batchgate_server.providers.executor.http1 import INVALID, Http1Pool, HttpClientError, check_request_target
from batchgate_server.providers.http_spans import client_span, tracing_on


# pyreqwest 0.15 (proxied upstreams) can lose a cancellation: a task cancelled just as its request completes may stay
# "cancelling" forever, waiting inside pyreqwest's clean-up (measured: under uvloop about half of
# the runs that cancel 8 busy workers leave one stuck). Cancelling it again ends it every time
# (0 stuck in 200 such runs). Everything that cancels a task awaiting this transport ends it with
# cancel_until_done.
RECANCEL_INTERVAL = 0.05


async def cancel_until_done(tasks: list[asyncio.Future]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again those still running
    every RECANCEL_INTERVAL seconds (see above). Their results and errors are dropped."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" log


@dataclass
class TransportResponse:
    status: int
    headers: Mapping[str, str]  # .get() by lower-case name
    body: bytes


class TransportFailure(Exception):
    """No usable HTTP answer: connection refused/reset, timeout (`upstream_fault`: says nothing about
    the request, may be an outage), or an answer that is not HTTP or over the client's limits (the
    server answered: the request's own failure)."""

    def __init__(self, code: str, message: str, upstream_fault: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.upstream_fault = upstream_fault


def _from_client(err: HttpClientError) -> TransportFailure:
    return TransportFailure(err.code, err.message, upstream_fault=err.code != INVALID)


def _failure(err: PyreqwestError, timeout: float, base_url: str) -> TransportFailure:
    if isinstance(err, RequestTimeoutError):
        return TransportFailure("request_timeout", f"no answer within {timeout:g}s")
    # args: (summary, {"causes": [{"message": ...}, ...]}); the last cause is the root one
    # ("Connection refused (os error 111)").
    summary = err.args[0] if err.args else ""
    details = err.args[1] if len(err.args) > 1 and isinstance(err.args[1], dict) else {}
    causes = details.get("causes") or []
    root = causes[-1].get("message", "") if causes and isinstance(causes[-1], dict) else ""
    if isinstance(err, ConnectError):
        return TransportFailure("connection_error", f"Cannot connect to {base_url}: {root or summary}")
    return TransportFailure("connection_error", f"{type(err).__name__}: {summary}" + (f" ({root})" if root else ""))


def proxied(base_url: str) -> bool:
    """Whether the environment sends requests to `base_url` through a proxy (as reqwest reads it:
    the scheme's variable or ALL_PROXY, unless NO_PROXY names the host)."""
    parts = urllib.parse.urlsplit(base_url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(parts.hostname or "", proxies)


def _origin_url(base_url: str) -> str:
    # "…/v1" or a bare host both work: request paths carry their own /v1.
    url = base_url.strip().rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _request_headers(api_key: str | None, extra_headers: dict[str, str] | None) -> dict[str, str]:
    headers = {"content-type": "application/json", **(extra_headers or {})}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


class HttpTransport:
    @staticmethod
    def check(base_url: str, api_key: str | None) -> None:
        """ValueError if requests cannot be sent to `base_url` with `api_key` (not an http(s)
        origin, a line break in the key), without building the client."""
        check_request_target(_origin_url(base_url), _request_headers(api_key, None))

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, max_connections: int,
                 extra_headers: dict[str, str] | None = None) -> None:
        self.base_url = _origin_url(base_url)
        self._headers = _request_headers(api_key, extra_headers)
        self._timeout = timeout
        self._max_connections = max_connections
        # Checked here, not at the first request: a malformed api_base or header is the
        # deployment's misconfiguration.
        self._pool = self._new_pool()
        self._via_proxy = proxied(self.base_url)
        self._session: Client | None = None
        self._reaping: set[asyncio.Future] = set()  # cancelled probes being ended
        # Asked once: tracing is set up at start-up, before any transport, and cannot be unset;
        # asking per request cost ~3 us (OpenTelemetry reads the environment each time).
        self._traced = tracing_on()

    def _new_pool(self) -> Http1Pool:
        return Http1Pool(self.base_url, self._headers, timeout=self._timeout, max_connections=self._max_connections)

    def _client(self) -> Client:
        # Built on first use: the client binds to the running event loop.
        if self._session is None:
            self._session = (ClientBuilder().max_connections(self._max_connections)
                             .timeout(timedelta(seconds=self._timeout)).default_headers(self._headers)
                             .build())
        return self._session

    async def send(self, path: str, body: bytes, custom_id: str) -> TransportResponse:
        if self._traced:
            with client_span("POST", path, self.base_url) as span:
                resp = await self._post(path, body)
                span.set_attribute("http.response.status_code", resp.status)
                return resp
        return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> TransportResponse:
        if self._via_proxy:
            return await self._post_via_proxy(path, body)
        try:
            answer = await self._pool.request("POST", path, body)
        except HttpClientError as err:
            raise _from_client(err) from None
        return TransportResponse(answer.status, answer.headers, answer.body)

    async def _post_via_proxy(self, path: str, body: bytes) -> TransportResponse:
        try:
            resp = await self._client().post(self.base_url + path).body_bytes(body).build().send()
            data = await resp.bytes()
        except PyreqwestError as err:
            raise _failure(err, self._timeout, self.base_url) from None
        return TransportResponse(resp.status, resp.headers, bytes(data))

    async def probe(self, path: str) -> int:
        """The status of a GET of `path` (the models list), for the deployment health checks,
        which cancel it at their own timeout: the GET runs as its own task, ended by
        cancel_until_done when the probe is cancelled."""
        task = asyncio.ensure_future(self._get(path))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._reaping.add(reaper := asyncio.ensure_future(cancel_until_done([task])))
            reaper.add_done_callback(self._reaping.discard)
            raise

    async def _get(self, path: str) -> int:
        if not self._via_proxy:
            try:
                return (await self._pool.request("GET", path, capped=False)).status
            except HttpClientError as err:
                raise _from_client(err) from None
        try:
            resp = await self._client().get(self.base_url + path).build().send()
            await resp.bytes()
        except PyreqwestError as err:
            raise _failure(err, self._timeout, self.base_url) from None
        return resp.status

    async def close(self) -> None:
        """Its connections close; it stays usable (a run being set up may hold it still), on new ones."""
        pool, self._pool = self._pool, self._new_pool()
        await pool.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
