"""The executor's HTTP/1.1 client: a pool of keep-alive connections to one origin, on asyncio
protocols, with llhttp (the parser of Node.js, through httptools) reading the answers.

Why its own client: the executor's cost is CPU per request, and the machine it runs on is usually
shared with the server it calls. Measured against the same local fake at 128 requests in flight
(uvloop, the 2-core machine): pyreqwest spends 88-100 us of process CPU per request (36 on the event
loop, 52-73 on its Rust runtime's thread), this client 40-48 us, all on the loop; in
bench/executor.py the server's CPU per request fell from 145-192 to 77-127 us. The executor needs
little of a general client: one origin, POST and GET, a body in memory, an answer read whole.

What it does: keep-alive connections, at most `max_connections` open, the most recently used first;
a connection the server closed while idle, or idle for IDLE_SECONDS, is dropped, and a request whose
reused connection closes within RACE_SECONDS, before any byte of the answer, goes once more on a new
connection (the server closed it as the request left: a keep-alive race, nothing was answered); one
deadline per request from when it has a connection, connecting included; answers with a
Content-Length, chunked, or ended by the server closing the connection; 1xx answers skipped; https
with the system's CAs (SSL_CERT_FILE names another bundle). Proxies are the caller's business
(transport.py).

Every failure is an HttpClientError with the executor's code: connection_error (no connection, or
the connection lost), request_timeout, or invalid_response (an answer that is not HTTP/1.1 or is
over the limits below: the server answered, so it is the request's failure, not an outage).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

import httptools

# An answer is held whole in memory: bounded, so a server that never stops sending cannot
# exhaust the process (an embeddings answer for 2,048 inputs of 3,072 floats is about 130 MB).
MAX_BODY = 256 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
# A connection unused this long is closed rather than reused (as hyper does): a NAT or load balancer
# may have forgotten it without a word, and a request on it would wait for its whole timeout.
IDLE_SECONDS = 90.0
# The keep-alive race: a reused connection the server closed as the request left shows it within
# a round trip. One that closes later, unanswered, was the server's failure while working on it:
# not sent again here (the executor's own retry, with its backoff and counts, decides).
RACE_SECONDS = 0.25
INVALID = "invalid_response"


def _reason(err: OSError) -> str:
    """Why a connection could not be made, in words ("Connection refused (os error 111)"):
    asyncio's own text names only the address."""
    if isinstance(err, ssl.SSLError):  # [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: …
        return str(err)
    if isinstance(err, socket.gaierror):  # Name or service not known
        return err.strerror or str(err)
    if err.errno and err.errno > 0:
        return f"{os.strerror(err.errno)} (os error {err.errno})"
    return str(err) or type(err).__name__


class HttpClientError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme, host and port, and the path every request path is put under."""

    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix" (no trailing slash)

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urllib.parse.urlsplit(base_url.strip())
        # Messages name the URL without its user:password@, which may hold a secret.
        shown = repr(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"api_base {shown} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"api_base {shown}: no user:password@ in it (api_key sets the key)")
        if parts.query or parts.fragment:
            raise ValueError(f"api_base {shown}: no query or fragment")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"api_base {shown} has a port that is not a number from 0 to 65535") from None
        try:
            parts.hostname.encode("idna")  # what connecting does with it
        except UnicodeError:
            raise ValueError(f"api_base {shown} has a host name that is not valid (a label over 63 "
                             "characters?)") from None
        # Sent as it is on the request line: what is not allowed there is percent-encoded (as
        # pyreqwest did), what is already encoded stays.
        path = urllib.parse.quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
        return cls(scheme, parts.hostname, port, path)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _header_block(headers: dict[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
            # The value is not repeated: it may be a key.
            raise ValueError(f"header {name.splitlines()[0][:40]!r} has a line break (or a colon in its name)")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


def check_request_target(base_url: str, headers: dict[str, str]) -> None:
    """ValueError unless requests can go to `base_url` with `headers` (what Http1Pool checks)."""
    Origin.parse(base_url)
    _header_block(headers)


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection; at most one request on it at a time (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0  # loop time it went back to the pool
        self.sent_at = 0.0  # loop time the current request was written
        self._parser = httptools.HttpResponseParser(self)
        # Content-Length beside chunked: chunked wins (RFC 9112 6.3; hyper and pyreqwest read it so).
        self._parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self._waiter: asyncio.Future | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._head_bytes = 0  # bytes received before the headers ended
        self._header_bytes = 0  # names and values parsed
        self._body: list[bytes] = []
        self._size = 0
        self._got_bytes = False  # any byte of the answer to the current request
        self._headers_done = False
        self._delimited = False  # the parser knows where the body ends (else: at the connection's end)

    # -- the caller's side ----------------------------------------------------------------

    def send(self, head: bytes, body: bytes | None) -> asyncio.Future:
        self._reset()
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self.sent_at = loop.time()
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return waiter

    def abort(self) -> None:
        self.closed = True
        self._waiter = None
        if self.transport is not None:
            self.transport.abort()

    def fail(self, code: str, message: str) -> None:
        """End the current request with an error and drop the connection (a deadline, a bad answer)."""
        waiter = self._waiter
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpClientError(code, message))

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for, on an idle connection: not to be trusted
            self.abort()
            return
        self._got_bytes = True
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            return  # a callback failed the request already (too large, bytes nobody asked for)
        except httptools.HttpParserUpgrade:
            self.fail(INVALID, "the server switched protocols (101): not an HTTP/1.1 answer")
            return
        except httptools.HttpParserError as err:
            self.fail(INVALID, f"the server's answer is not valid HTTP/1.1 ({err})")
            return
        # Counted here, not per header: the parser holds a header line until it ends, and an
        # endless one would grow in memory until the deadline.
        if not self._headers_done and self._head_bytes > MAX_HEADER_BYTES and self._waiter is not None:
            self._too_many_header_bytes()

    def _too_many_header_bytes(self) -> None:
        self.fail(INVALID, f"the server's answer has more than {MAX_HEADER_BYTES} bytes of headers")

    def eof_received(self) -> bool:
        if self._waiter is not None and self._headers_done and not self._delimited:
            self._complete(keep_alive=False)  # an answer without a length ends with the connection
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if (self._waiter is not None and self._headers_done and not self._delimited
                and (exc is None or isinstance(exc, ssl.SSLEOFError))):
            # An answer without a length ends with the connection: over TLS uvloop reports a close
            # without close_notify here, not in eof_received (asyncio's loop accepts it there too).
            self._complete(keep_alive=False)
            return
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if not self._got_bytes:
            err = _Closed("the server closed the connection before answering",
                          asyncio.get_running_loop().time() - self.sent_at)
        else:
            err = HttpClientError("connection_error", "the server closed the connection in the middle of its answer")
        waiter.set_exception(err)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second answer in the bytes of the last one: nothing asked for it, and what follows
            # on this connection cannot be trusted.
            self.abort()
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:  # a whole block over the limit in one read
            self._too_many_header_bytes()
            raise _Refused
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        # Where the body ends, as llhttp reads it: chunked last, else a Content-Length without a
        # Transfer-Encoding, else at the connection's end (RFC 9112 6.3).
        coding = self._headers.get("transfer-encoding")
        if coding is not None:
            self._delimited = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
        else:
            self._delimited = "content-length" in self._headers or self._status in (204, 304)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY:
            self.fail(INVALID, f"the server's answer is larger than {MAX_BODY // 2**20} MiB")
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # 100 Continue, 103 Early Hints: the real answer follows
            self._reset()
            self._got_bytes = True
            return
        self._complete(keep_alive=self._parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if not keep_alive:
            self.closed = True
            self.transport.close()
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result(HttpAnswer(self._status, self._headers, body))


class _Closed(HttpClientError):
    """The connection closed before any byte of the answer, `after` seconds from the request's write."""

    def __init__(self, message: str, after: float) -> None:
        super().__init__("connection_error", message)
        self.after = after


class _Refused(Exception):
    """Raised from a parser callback to stop the parse (the request has failed already)."""


class Http1Pool:
    """Requests to one origin over at most `max_connections` keep-alive connections."""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout: float, max_connections: int) -> None:
        self.origin = Origin.parse(base_url)
        self.base_url = base_url
        self._timeout = timeout
        self._max = max(1, max_connections)
        self._fixed_headers = _header_block({"host": self.origin.host_header, "user-agent": "batchgate",
                                             **headers})
        # https: made on a worker thread at the first connection (loading the CAs takes ~50 ms).
        self._tls: asyncio.Future | None = None
        self._heads: dict[tuple[str, str], bytes] = {}
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._busy = 0  # requests holding a slot
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._closed = False

    async def request(self, method: str, path: str, body: bytes | None = None, *, capped: bool = True) -> HttpAnswer:
        """`capped=False`: not counted against max_connections (a health probe, which must not wait
        behind the requests it checks on: one at a time, so at most one connection more)."""
        if self._closed:
            raise HttpClientError("connection_error", "the client is closed")
        if capped:
            await self._take_slot()
        try:
            # From the slot on: a request waiting for a connection (more requests than
            # max_connections, several batches on the deployment) has not been sent yet.
            deadline = asyncio.get_running_loop().time() + self._timeout
            head = self._head(method, path, body)
            conn = self._reuse()
            fresh = conn is None
            while True:
                if conn is None:
                    conn = await self._connect(deadline)
                try:
                    return await self._exchange(conn, head, body, deadline)
                except _Closed as err:
                    # A reused connection the server had closed as the request left: once more
                    # on a new one. A new connection that closes unanswered, or a reused one that
                    # closes later (the server failed while working on it), is the server's fault.
                    if fresh or err.after > RACE_SECONDS:
                        raise
                    conn, fresh = None, True
        finally:
            if capped:
                self._give_slot()

    def _head(self, method: str, path: str, body: bytes | None) -> bytes:
        start = self._heads.get((method, path))
        if start is None:
            target = self.origin.base_path + path
            if any(c in target for c in " \r\n"):
                raise ValueError(f"request path {target!r} has a space or a line break")
            start = self._heads[(method, path)] = (f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
                                                   + self._fixed_headers)
        if body is None:
            return start + b"\r\n"
        return start + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes | None, deadline: float) -> HttpAnswer:
        loop = asyncio.get_running_loop()
        waiter = conn.send(head, body)
        timer = loop.call_at(deadline, conn.fail, "request_timeout", f"no answer within {self._timeout:g}s")
        try:
            answer = await waiter
        except BaseException:  # a failure or a cancellation: the connection's state is unknown
            conn.abort()
            self._open.discard(conn)
            raise
        finally:
            timer.cancel()
        if conn.closed:
            self._open.discard(conn)
        else:
            conn.idle_since = loop.time()
            self._idle.append(conn)
        return answer

    def _reuse(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                if now - conn.idle_since <= IDLE_SECONDS:
                    return conn
                conn.abort()
            self._open.discard(conn)
        return None

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout_at(deadline):
                tls = await self._tls_context() if origin.scheme == "https" else None
                _, conn = await loop.create_connection(
                    _Connection, origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls is not None else None)
        except TimeoutError:
            raise HttpClientError("request_timeout", f"no answer within {self._timeout:g}s") from None
        except OSError as err:
            raise HttpClientError("connection_error", f"Cannot connect to {self.base_url}: {_reason(err)}") from None
        if self._closed:
            conn.abort()
            raise HttpClientError("connection_error", "the client is closed")
        self._open.add(conn)
        return conn

    async def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = asyncio.ensure_future(asyncio.to_thread(ssl.create_default_context))
        return await asyncio.shield(self._tls)  # shared: one request's cancel does not end it

    async def _take_slot(self) -> None:
        if self._busy < self._max and not self._waiters:
            self._busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # a request that ends hands its slot over: _busy stays as it is
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_slot()  # handed over as the cancel came: pass it on
            elif waiter in self._waiters:  # (a request that ended meanwhile may have dropped it)
                self._waiters.remove(waiter)
            raise

    def _give_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._busy -= 1

    @property
    def connections(self) -> int:
        """Connections open now (idle or in use)."""
        return sum(1 for conn in self._open if not conn.closed)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.fail("connection_error", "the client is closed")
        self._open.clear()
        self._idle.clear()
