"""The executor's HTTP/1.1 client (providers/executor/http1.py) against real sockets on loopback:
servers that answer well, and servers that close, stall, lie or send too much."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time

import pytest
import trustme
import uvloop

from batchgate_server.providers.executor import http1
from batchgate_server.providers.executor.http1 import Http1Pool, HttpClientError
from batchgate_server.providers.executor.transport import HttpTransport, TransportFailure, proxied


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request):
    """Each test on asyncio's own loop and on uvloop's, the server's."""
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes] | None:
    """One request off the connection: (request line, headers, body); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *rest = head[:-4].split(b"\r\n")
    headers = {}
    for raw in rest:
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return line, headers, body


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


class Server:
    """A loopback TCP server; `serve(conn_no, reader, writer)` handles each connection."""

    def __init__(self, serve) -> None:
        self._serve = serve
        self.connections = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.open_now = 0
        self.most_open = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self._serve(self.connections, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def next_request(self, reader):
        request = await read_request(reader)
        if request is not None:
            self.requests.append(request)
        return request


def pool(url: str, *, timeout: float = 5.0, max_connections: int = 8, **headers) -> Http1Pool:
    return Http1Pool(url, {"content-type": "application/json", **headers}, timeout=timeout,
                     max_connections=max_connections)


async def refused(serve, *, timeout: float = 5.0) -> HttpClientError:
    """The error of one request to a Server running `serve`; the connection is dropped with it."""
    async with Server(serve) as srv:
        client = pool(srv.url, timeout=timeout)
        with pytest.raises(HttpClientError) as err:
            await client.request("POST", "/x", b"{}")
        assert client.connections == 0
        await client.close()
    return err.value


async def test_keep_alive_answers_on_one_connection_with_headers_as_sent():
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            writer.write(ok(b'{"n":1}', b"x-request-id: abc\r\nset-thing: a\r\nSet-Thing: b\r\n"))

    async with Server(serve) as srv:
        client = pool(srv.url + "/prefix", authorization="Bearer k")
        for i in range(5):
            answer = await client.request("POST", "/v1/chat/completions", b'{"i":%d}' % i)
            assert (answer.status, answer.body) == (200, b'{"n":1}')
            assert answer.headers["x-request-id"] == "abc"
            assert answer.headers["set-thing"] == "a, b"
        await client.close()
    assert srv.connections == 1
    line, headers, body = srv.requests[-1]
    assert line == b"POST /prefix/v1/chat/completions HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{srv.port}"
    assert headers["authorization"] == "Bearer k" and headers["content-type"] == "application/json"
    assert headers["content-length"] == "7" and body == b'{"i":4}'


async def test_get_sends_no_body():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(ok(b"[]"))
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        assert (await client.request("GET", "/v1/models")).status == 200
        await client.close()
    line, headers, body = srv.requests[0]
    assert line == b"GET /v1/models HTTP/1.1" and "content-length" not in headers and body == b""


async def test_chunked_answer_is_joined():
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in (b'{"a":', b'"bc"', b"}"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")

    async with Server(serve) as srv:
        client = pool(srv.url)
        for _ in range(2):
            assert (await client.request("POST", "/x", b"{}")).body == b'{"a":"bc"}'
        await client.close()
    assert srv.connections == 1


@pytest.mark.parametrize("headers", [b"connection: close\r\n", b"transfer-encoding: identity\r\n"])
async def test_answer_without_a_length_ends_with_the_connection(headers):
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n{\"whole\":")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"true}")

    async with Server(serve) as srv:
        client = pool(srv.url)
        assert (await client.request("POST", "/x", b"{}")).body == b'{"whole":true}'
        assert (await client.request("POST", "/x", b"{}")).body == b'{"whole":true}'
        assert client.connections == 0  # each closed with its answer
        await client.close()
    assert srv.connections == 2


async def test_informational_answers_are_skipped():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"{}"))
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        answer = await client.request("POST", "/x", b"{}")
        assert (answer.status, answer.body) == (200, b"{}") and "link" not in answer.headers
        await client.close()


async def test_error_statuses_are_answers():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 2\r\n\r\n{}")
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        answer = await client.request("POST", "/x", b"{}")
        assert (answer.status, answer.headers["retry-after"]) == (429, "3")
        await client.close()


async def test_connection_closed_while_idle_is_not_used_again():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.05)  # like a server's keep-alive timeout

    async with Server(serve) as srv:
        client = pool(srv.url)
        await client.request("POST", "/x", b"{}")
        await asyncio.sleep(0.3)
        assert client.connections == 0
        assert (await client.request("POST", "/x", b"{}")).status == 200
        await client.close()
    assert srv.connections == 2 and len(srv.requests) == 2


async def test_reused_connection_closed_as_the_request_leaves_is_tried_once_more_on_a_new_one():
    async def serve(conn_no, reader, writer):
        await srv.next_request(reader)
        writer.write(ok())
        await writer.drain()
        if conn_no == 1:
            await srv.next_request(reader)  # the keep-alive race: read, then gone without a word
            return
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        await client.request("POST", "/x", b"1")
        assert (await client.request("POST", "/x", b"2")).status == 200
        await client.close()
    assert srv.connections == 2
    assert [body for _, _, body in srv.requests] == [b"1", b"2", b"2"]


async def test_new_connection_closed_unanswered_fails_without_a_second_try():
    async def serve(_, reader, writer):
        await srv.next_request(reader)

    async with Server(serve) as srv:
        client = pool(srv.url)
        with pytest.raises(HttpClientError) as err:
            await client.request("POST", "/x", b"{}")
        assert err.value.code == "connection_error"
        assert "closed the connection before answering" in err.value.message
        await client.close()
    assert len(srv.requests) == 1


async def test_no_answer_in_time_is_a_timeout_and_frees_the_connection():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        await reader.read()  # never answers

    async with Server(serve) as srv:
        client = pool(srv.url, timeout=0.3, max_connections=1)
        started = time.monotonic()
        with pytest.raises(HttpClientError) as err:
            await client.request("POST", "/x", b"{}")
        assert 0.25 < time.monotonic() - started < 2
        assert (err.value.code, err.value.message) == ("request_timeout", "no answer within 0.3s")
        assert client.connections == 0
        with pytest.raises(HttpClientError):  # its one slot was given back
            await asyncio.wait_for(client.request("POST", "/x", b"{}"), 2)
        await client.close()


async def test_a_slow_answer_is_timed_as_a_whole():
    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        for _ in range(100):  # a byte every 20 ms: each arrives in time, the whole does not
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.02)

    assert (await refused(serve, timeout=0.5)).code == "request_timeout"


async def test_refused_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = pool(f"http://127.0.0.1:{port}")
    with pytest.raises(HttpClientError) as err:
        await client.request("POST", "/x", b"{}")
    assert err.value.code == "connection_error"
    assert err.value.message.startswith(f"Cannot connect to http://127.0.0.1:{port}: ")
    assert err.value.message.endswith("Connection refused (os error 111)")
    await client.close()


@pytest.mark.parametrize("answer, code, expected", [
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "invalid_response", "not valid HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"short\":", "connection_error", "in the middle of its answer"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!", "invalid_response",
     "not valid HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "invalid_response", "not valid HTTP/1.1"),
])
async def test_answers_that_are_not_http_or_are_cut_short(answer, code, expected):
    """Not HTTP: the server answered (invalid_response, the request's failure); cut short: the
    connection was lost (connection_error, maybe an outage)."""
    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(answer)

    err = await refused(serve)
    assert err.code == code and expected in err.message


async def test_an_answer_too_large_is_refused(monkeypatch):
    monkeypatch.setattr(http1, "MAX_BODY", 1000)

    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:  # never ends
            writer.write(b"100\r\n" + b"x" * 256 + b"\r\n")
            await writer.drain()

    err = await refused(serve)
    assert err.code == "invalid_response" and "larger than" in err.message


async def test_endless_headers_are_refused():
    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:
            writer.write(b"x-junk: " + b"y" * 1000 + b"\r\n")
            await writer.drain()

    assert "bytes of headers" in (await refused(serve)).message


async def test_an_endless_header_line_is_refused_before_the_deadline():
    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-junk: ")
        while True:  # one header line that never ends
            writer.write(b"y" * 4096)
            await writer.drain()

    started = time.monotonic()
    assert "bytes of headers" in (await refused(serve, timeout=30)).message
    assert time.monotonic() - started < 5


async def test_a_second_answer_in_the_bytes_of_the_first_is_dropped_with_its_connection():
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            if srv.connections == 1:  # the first connection answers twice at once
                writer.write(ok(b'{"a":1}', b"x-a: 1\r\n") + ok(b'{"injected":1}', b"x-injected: yes\r\n"))
            else:
                writer.write(ok(b'{"b":2}'))

    async with Server(serve) as srv:
        client = pool(srv.url)
        first = await client.request("POST", "/x", b"{}")
        assert first.body == b'{"a":1}' and "x-injected" not in first.headers
        second = await client.request("POST", "/x", b"{}")
        assert second.body == b'{"b":2}'
        await client.close()
    assert srv.connections == 2


async def test_switching_protocols_is_not_an_answer():
    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        await reader.read()

    err = await refused(serve)
    assert err.code == "invalid_response" and "switched protocols" in err.message


async def test_bytes_on_an_idle_connection_drop_it():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlies")  # answers nothing asked
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        await client.request("POST", "/x", b"{}")
        await asyncio.sleep(0.2)
        assert client.connections == 0
        await client.close()


async def test_cancelled_request_drops_its_connection_and_gives_back_its_slot():
    async def serve(conn_no, reader, writer):
        await srv.next_request(reader)
        if conn_no == 1:
            await reader.read()  # the first request hangs
            return
        writer.write(ok())
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url, max_connections=1)
        task = asyncio.ensure_future(client.request("POST", "/x", b"{}"))
        waiting = asyncio.ensure_future(client.request("POST", "/x", b"{}"))  # queued for the one slot
        await asyncio.sleep(0.1)
        task.cancel()
        assert (await asyncio.wait_for(waiting, 2)).status == 200
        assert task.cancelled() and client.connections == 1
        await client.close()


async def test_a_queued_request_cancelled_leaves_the_queue():
    release = asyncio.Event()

    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            await release.wait()
            writer.write(ok())

    async with Server(serve) as srv:
        client = pool(srv.url, max_connections=1)
        first = asyncio.ensure_future(client.request("POST", "/x", b"1"))
        queued = asyncio.ensure_future(client.request("POST", "/x", b"2"))
        third = asyncio.ensure_future(client.request("POST", "/x", b"3"))
        await asyncio.sleep(0.05)
        queued.cancel()
        release.set()
        assert (await first).status == 200 and (await third).status == 200
        await client.close()
    assert [body for _, _, body in srv.requests] == [b"1", b"3"]


async def test_requests_cancelled_all_at_once_in_flight_and_queued_all_end_cancelled():
    """As a batch's stop cancels its workers: the ones in flight give their slots to queued ones
    that are themselves cancelled already."""
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            await asyncio.sleep(10)

    async with Server(serve) as srv:
        client = pool(srv.url, timeout=30, max_connections=2)
        tasks = [asyncio.ensure_future(client.request("POST", "/x", b"{}")) for _ in range(6)]
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        assert (client._busy, len(client._waiters)) == (0, 0)
        await client.close()


async def many_at_once(requests: int, answer_after: float, **pool_args) -> tuple[list[http1.HttpAnswer], Server]:
    """`requests` requests at once to a server answering each after `answer_after` seconds."""
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            await asyncio.sleep(answer_after)
            writer.write(ok())

    async with Server(serve) as srv:
        client = pool(srv.url, **pool_args)
        answers = await asyncio.gather(*(client.request("POST", "/x", b"{}") for _ in range(requests)))
        await client.close()
    return answers, srv


async def test_a_request_waiting_for_a_connection_is_not_timed_until_it_has_one():
    # 6 requests on 2 connections: three rounds of 0.3 s, each within the 0.6 s timeout
    answers, srv = await many_at_once(6, 0.3, timeout=0.6, max_connections=2)
    assert [a.status for a in answers] == [200] * 6 and len(srv.requests) == 6


async def test_at_most_max_connections_open():
    answers, srv = await many_at_once(30, 0.03, max_connections=3)
    assert all(a.status == 200 for a in answers)
    assert srv.most_open == 3 and srv.connections == 3


async def test_close_ends_requests_in_flight_and_refuses_new_ones():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        task = asyncio.ensure_future(client.request("POST", "/x", b"{}"))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(HttpClientError):
            await task
        with pytest.raises(HttpClientError):
            await client.request("POST", "/x", b"{}")


@pytest.mark.parametrize("url", ["ftp://host/v1", "http:///v1", "http://h:99999", "http://u:s3cret@h/v1",
                                 "http://:s3cret@h/v1", "http://h/?q=1", "http://" + "a" * 64 + ".example/v1"])
async def test_api_base_that_is_not_an_http_origin_is_refused(url):
    with pytest.raises(ValueError) as err:
        pool(url)
    assert "s3cret" not in str(err.value)  # CreateBatch shows the message to its caller


async def test_api_base_path_is_sent_percent_encoded_and_its_scheme_in_any_case():
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            writer.write(ok())

    async with Server(serve) as srv:
        client = pool(f"HTTP://127.0.0.1:{srv.port}/my models/ünï/ ")
        assert (await client.request("POST", "/v1/x", b"{}")).status == 200
        await client.close()
    assert srv.requests[0][0] == b"POST /my%20models/%C3%BCn%C3%AF/v1/x HTTP/1.1"


async def test_content_length_beside_chunked_reads_chunked():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n")
        await reader.read()

    async with Server(serve) as srv:
        client = pool(srv.url)
        assert (await client.request("POST", "/x", b"{}")).body == b"{}"
        await client.close()


async def test_a_reused_connection_closed_later_unanswered_is_not_sent_again():
    """The server read the request and failed while working on it: that is not the keep-alive
    race, and the request goes back to the executor (its retry has a backoff, and is counted)."""
    async def serve(conn_no, reader, writer):
        await srv.next_request(reader)
        writer.write(ok())
        await writer.drain()
        await srv.next_request(reader)
        await asyncio.sleep(0.6)  # working on it, then gone

    async with Server(serve) as srv:
        client = pool(srv.url)
        await client.request("POST", "/x", b"1")
        with pytest.raises(HttpClientError) as err:
            await client.request("POST", "/x", b"2")
        assert err.value.code == "connection_error"
        await client.close()
    assert [body for _, _, body in srv.requests] == [b"1", b"2"]


async def test_a_connection_idle_too_long_is_not_used_again(monkeypatch):
    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.1)

    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            writer.write(ok())

    async with Server(serve) as srv:
        client = pool(srv.url)
        await client.request("POST", "/x", b"{}")
        await client.request("POST", "/x", b"{}")  # at once: the same connection
        await asyncio.sleep(0.2)
        await client.request("POST", "/x", b"{}")
        await client.close()
    assert srv.connections == 2


async def test_a_header_block_over_the_limit_in_one_write_is_refused():
    async def serve(_, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
                     + b"content-length: 2\r\n\r\n{}")
        await reader.read()

    assert "bytes of headers" in (await refused(serve)).message


async def test_a_closed_transport_serves_on_new_connections():
    """A run being set up may still hold the transport of an ad-hoc deployment whose last batch
    just released it."""
    async def serve(_, reader, writer):
        while await srv.next_request(reader) is not None:
            writer.write(ok())

    async with Server(serve) as srv:
        transport = HttpTransport(srv.url, None, timeout=5, max_connections=2)
        assert (await transport.send("/v1/chat/completions", b"{}", "a")).status == 200
        await transport.close()
        assert (await transport.send("/v1/chat/completions", b"{}", "b")).status == 200
        await transport.close()
    assert srv.connections == 2


async def test_line_breaks_in_headers_are_refused():
    with pytest.raises(ValueError):
        HttpTransport("http://127.0.0.1:1", "key\r\nx-evil: 1", timeout=1, max_connections=1)


async def test_https_checks_the_certificate(tmp_path, monkeypatch):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)

    async def handle(reader, writer):
        while (request := await read_request(reader)) is not None:
            writer.write(ok(request[2]))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        untrusting = pool(url)
        with pytest.raises(HttpClientError) as err:
            await untrusting.request("POST", "/x", b"{}")
        assert err.value.code == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in err.value.message
        await untrusting.close()

        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        trusting = pool(url)
        for i in range(3):
            assert (await trusting.request("POST", "/x", b"%d" % i)).body == b"%d" % i
        assert trusting.connections == 1
        await trusting.close()
    finally:
        server.close()


async def test_transport_maps_failures_to_the_executor_codes():
    async def serve(_, reader, writer):
        await srv.next_request(reader)
        await reader.read()

    async with Server(serve) as srv:
        transport = HttpTransport(srv.url + "/v1", None, timeout=0.2, max_connections=4)
        with pytest.raises(TransportFailure) as err:
            await transport.send("/v1/chat/completions", b"{}", "c1")
        assert err.value.code == "request_timeout"
        await transport.close()
    assert srv.requests[0][0] == b"POST /v1/chat/completions HTTP/1.1"  # "/v1" of api_base not doubled


async def test_proxy_from_the_environment(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not proxied("http://vllm.internal:8000/v1")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert proxied("http://vllm.internal:8000/v1") and not proxied("https://vllm.internal/v1")
    monkeypatch.setenv("NO_PROXY", "vllm.internal")
    assert not proxied("http://vllm.internal:8000/v1") and proxied("http://other:8000/v1")
    monkeypatch.setenv("ALL_PROXY", "http://proxy:3128")
    assert proxied("https://other/v1")


async def test_an_upstream_behind_a_proxy_is_reached_through_it(monkeypatch):
    async def serve(_, reader, writer):  # the proxy: answers for the upstream, as a caching proxy may
        while await srv.next_request(reader) is not None:
            writer.write(ok(b'{"via":"proxy"}'))

    async with Server(serve) as srv:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", srv.url)
        transport = HttpTransport("http://vllm.invalid:8000/v1", "k", timeout=5, max_connections=4)
        resp = await transport.send("/v1/chat/completions", b"{}", "c1")
        assert (resp.status, resp.body) == (200, b'{"via":"proxy"}')
        assert await transport.probe("/v1/models") == 200
        await transport.close()
    line, headers, _ = srv.requests[0]
    assert line == b"POST http://vllm.invalid:8000/v1/chat/completions HTTP/1.1"
    assert headers["authorization"] == "Bearer k"


@pytest.mark.parametrize("close_notify", [True, False])
async def test_https_answer_without_a_length_ends_with_the_connection(tmp_path, monkeypatch, close_notify):
    """Also when the server closes without TLS's close_notify (which uvloop reports differently)."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        tls = server_ctx.wrap_socket(conn, server_side=True)
        received = b""
        while b"\r\n\r\n" not in received:
            received += tls.recv(65536)
        tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nbody-until-close")
        if close_notify:
            with contextlib.suppress(ssl.SSLError, OSError):  # the client's own close_notify crosses ours
                tls.unwrap().close()
        else:  # a FIN without close_notify
            socket.socket(fileno=os.dup(tls.fileno())).shutdown(socket.SHUT_RDWR)
            tls.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = pool(f"https://localhost:{listener.getsockname()[1]}")
        answer = await client.request("POST", "/x", b"{}")
        assert (answer.status, answer.body) == (200, b"body-until-close")
        await client.close()
    finally:
        thread.join(5)
        listener.close()


async def test_a_probe_is_not_held_behind_the_requests_it_checks_on():
    """Every connection busy with a long request: the deployment's health probe still gets through."""
    async def serve(_, reader, writer):
        while (request := await srv.next_request(reader)) is not None:
            if request[0].startswith(b"POST"):
                await asyncio.sleep(30)  # a long generation
            writer.write(ok(b"[]"))

    async with Server(serve) as srv:
        transport = HttpTransport(srv.url + "/v1", None, timeout=60, max_connections=2)
        busy = [asyncio.ensure_future(transport.send("/v1/chat/completions", b"{}", f"c{i}")) for i in range(3)]
        await asyncio.sleep(0.2)
        assert await asyncio.wait_for(transport.probe("/v1/models"), 2) == 200
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        await transport.close()


async def test_the_tls_context_is_made_off_the_event_loop(tmp_path, monkeypatch):
    """Loading the CAs takes tens of milliseconds: not on the loop's thread, and once per pool."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    made_on: list[threading.Thread] = []
    original = ssl.create_default_context

    def recorded(*args, **kwargs):
        made_on.append(threading.current_thread())
        return original(*args, **kwargs)

    async def handle(reader, writer):
        while (request := await read_request(reader)) is not None:
            writer.write(ok(request[2]))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    monkeypatch.setattr(ssl, "create_default_context", recorded)
    try:
        client = pool(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", max_connections=4)
        answers = await asyncio.gather(*(client.request("POST", "/x", b"%d" % i) for i in range(4)))
        assert [a.body for a in answers] == [b"0", b"1", b"2", b"3"]
        assert len(made_on) == 1 and made_on[0] is not threading.main_thread()
        await client.close()
    finally:
        server.close()
