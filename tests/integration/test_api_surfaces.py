"""Isolation, validation and hostile-input cases run against both surfaces where they overlap: the gRPC
stubs (status code and ErrorInfo reason) and the OpenAI-compatible HTTP API (HTTP status, `code` = the
reason in lower case, `batchgate.reason` exact). Same core, same answers.

CASES is this module's table, each case with its call on either surface. The JSONL cases of
test_hostile_inputs.py (its gRPC table) are uploaded over HTTP here too, with the same limits, and
must name the same problem."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import aiohttp
import grpc
import pytest

from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import batch_file, error_details, jsonl, request_line, serving, upload_requests
from tests.integration import test_hostile_inputs as hostile
from tests.integration.batch_helpers import watch_all

MAX_FILE_BYTES = 4096


@dataclasses.dataclass
class World:
    h: object
    http: aiohttp.ClientSession
    file_id: str  # alice's (chat completions, simulated)
    ended_batch_id: str  # alice's, completed

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.h.server.http_port}{path}"


@pytest.fixture(scope="module")
async def world(tmp_path_factory) -> AsyncIterator[World]:
    async with serving(tmp_path_factory.mktemp("surfaces") / "data", http_address="127.0.0.1:0",
                       max_file_bytes=MAX_FILE_BYTES) as h:
        f = await h.upload(h.alice, batch_file(2, model="simulated"))
        batch = (await h.alice.batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
            metadata=h.alice.metadata)).batch
        await watch_all(h.alice, batch.id)
        async with aiohttp.ClientSession() as http:
            yield World(h, http, f.id, batch.id)


# -- the two surfaces' calls ----------------------------------------------------------------------

def headers(w: World, who: str) -> dict[str, str]:
    return {"alice": {"Authorization": f"Bearer {w.h.alice.api_key}"},
            "bob": {"Authorization": f"Bearer {w.h.bob.api_key}"}, "nobody": {},
            "wrong": {"Authorization": "Bearer bg-not-a-key"}, "basic": {"Authorization": "Basic YWxpY2U="}}[who]


def metadata(w: World, who: str):
    return tuple(headers(w, who).items()) and (("authorization", headers(w, who)["Authorization"]),)


async def http_call(w: World, method: str, path: str, who: str = "alice", **kw) -> tuple[int, dict]:
    async with w.http.request(method, w.url(path), headers={**headers(w, who), **kw.pop("headers", {})},
                              **kw) as response:
        return response.status, await response.json()


def form(content: bytes, filename: str = "in.jsonl", purpose: str = "batch") -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("purpose", purpose)
    data.add_field("file", content, filename=filename, content_type="application/jsonl")
    return data


def raw_form(content: bytes, filename: str) -> bytes:
    """A multipart body whose file part names `filename` as RFC 5987 `filename*` (percent-encoded
    UTF-8): the one way a control character can travel in a part header."""
    return (b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''" +
            quote(filename).encode() + b"\r\n\r\n" + content + b"\r\n--b0undary--\r\n")


async def grpc_upload(w: World, content: bytes, filename: str = "in.jsonl",
                      purpose: int = file_pb2.FILE_PURPOSE_BATCH):
    return await w.h.alice.files.UploadFile(upload_requests(content, filename=filename, purpose=purpose),
                                            metadata=w.h.alice.metadata)


async def grpc_create(w: World, who: str = "alice", **fields):
    request = dict(input_file_id=w.file_id, endpoint="/v1/chat/completions", completion_window="24h")
    request.update(fields)
    return await w.h.alice.batches.CreateBatch(batch_pb2.CreateBatchRequest(**request), metadata=metadata(w, who))


async def http_create(w: World, who: str = "alice", idempotency_key: str = "", **fields) -> tuple[int, dict]:
    body = dict(input_file_id=w.file_id, endpoint="/v1/chat/completions", completion_window="24h")
    body.update(fields)
    extra = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return await http_call(w, "POST", "/v1/batches", who, json=body, headers=extra)


async def grpc_watch(w: World, who: str, batch_id: str) -> None:
    async for _ in w.h.alice.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id),
                                                metadata=metadata(w, who)):
        pass


async def grpc_reuse(w: World):
    await grpc_create(w, request_id="surface-grpc")
    return await grpc_create(w, request_id="surface-grpc", metadata={"another": "batch"})


async def http_reuse(w: World):
    await http_create(w, idempotency_key="surface-http")
    return await http_create(w, idempotency_key="surface-http", metadata={"another": "batch"})


BAD_LINE = jsonl([request_line("a", model="simulated")]) + b'{"custom_id": "b", "method": "POST"\n'
SURROGATE = jsonl([request_line("a", model="simulated")]).replace(b'"a"', b'"\\ud800"')
META = {f"k{i}": "v" for i in range(17)}


@dataclasses.dataclass
class Case:
    name: str
    grpc_call: Callable[[World], Awaitable[object]]
    http_call: Callable[[World], Awaitable[tuple[int, dict]]]
    code: grpc.StatusCode
    reason: str
    status: int
    param: str | None = None  # the HTTP error's param, when the case pins it


def g_file(rpc: str, who: str):
    """FileService.<rpc> on alice's file, with `who`'s key."""
    request = getattr(file_pb2, f"{rpc}Request")
    return lambda w: getattr(w.h.alice.files, rpc)(request(file_id=w.file_id), metadata=metadata(w, who))


def g_ended_batch(rpc: str, who: str):
    """BatchService.<rpc> on alice's ended batch, with `who`'s key."""
    request = getattr(batch_pb2, f"{rpc}Request")
    return lambda w: getattr(w.h.alice.batches, rpc)(request(batch_id=w.ended_batch_id), metadata=metadata(w, who))


def h_call(method: str, path: str, who: str = "alice"):
    """An HTTP call with `who`'s key; `path` may name {file_id} (alice's file) and {batch_id} (her ended batch)."""
    return lambda w: http_call(w, method, path.format(file_id=w.file_id, batch_id=w.ended_batch_id), who)


CASES = [
    Case("missing key", g_file("GetFile", "nobody"), h_call("GET", "/v1/files/{file_id}", "nobody"),
         grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY", 401),
    Case("wrong key", g_file("GetFile", "wrong"), h_call("GET", "/v1/files/{file_id}", "wrong"),
         grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY", 401),
    Case("not a bearer key", g_file("GetFile", "basic"), h_call("GET", "/v1/files/{file_id}", "basic"),
         grpc.StatusCode.UNAUTHENTICATED, "MALFORMED_API_KEY", 401),
    Case("another project's file", g_file("GetFile", "bob"), h_call("GET", "/v1/files/{file_id}", "bob"),
         grpc.StatusCode.NOT_FOUND, "FILE_NOT_FOUND", 404),
    Case("another project's file content",
         lambda w: _drain(w.h.alice.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=w.file_id),
                                                       metadata=metadata(w, "bob"))),
         h_call("GET", "/v1/files/{file_id}/content", "bob"),
         grpc.StatusCode.NOT_FOUND, "FILE_NOT_FOUND", 404),
    Case("deleting another project's file", g_file("DeleteFile", "bob"), h_call("DELETE", "/v1/files/{file_id}", "bob"),
         grpc.StatusCode.NOT_FOUND, "FILE_NOT_FOUND", 404),
    Case("another project's file as batch input", lambda w: grpc_create(w, "bob"), lambda w: http_create(w, "bob"),
         grpc.StatusCode.NOT_FOUND, "FILE_NOT_FOUND", 404),
    Case("another project's batch", g_ended_batch("GetBatch", "bob"), h_call("GET", "/v1/batches/{batch_id}", "bob"),
         grpc.StatusCode.NOT_FOUND, "BATCH_NOT_FOUND", 404),
    Case("cancelling another project's batch", g_ended_batch("CancelBatch", "bob"),
         h_call("POST", "/v1/batches/{batch_id}/cancel", "bob"), grpc.StatusCode.NOT_FOUND, "BATCH_NOT_FOUND", 404),
    Case("watching another project's batch", lambda w: grpc_watch(w, "bob", w.ended_batch_id),
         h_call("GET", "/v1/batches/{batch_id}/events", "bob"),
         grpc.StatusCode.NOT_FOUND, "BATCH_NOT_FOUND", 404),
    Case("an unknown batch", lambda w: grpc_watch(w, "alice", "batch_nope"),
         h_call("GET", "/v1/batches/batch_nope"), grpc.StatusCode.NOT_FOUND, "BATCH_NOT_FOUND", 404),
    Case("a broken JSONL line", lambda w: grpc_upload(w, BAD_LINE),
         lambda w: http_call(w, "POST", "/v1/files", data=form(BAD_LINE)), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_BATCH_FILE", 400, "line 2"),
    Case("an unpaired surrogate", lambda w: grpc_upload(w, SURROGATE),
         lambda w: http_call(w, "POST", "/v1/files", data=form(SURROGATE)), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_BATCH_FILE", 400, "line 1"),
    Case("an empty file", lambda w: grpc_upload(w, b""), lambda w: http_call(w, "POST", "/v1/files", data=form(b"")),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH_FILE", 400, "file"),
    Case("a filename with a control character", lambda w: grpc_upload(w, batch_file(1), filename="a\x07b.jsonl"),
         lambda w: http_call(w, "POST", "/v1/files", data=raw_form(batch_file(1), "a\x07b.jsonl"),
                             headers={"Content-Type": "multipart/form-data; boundary=b0undary"}),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILENAME", 400, "filename"),
    Case("uploading a batch_output file", lambda w: grpc_upload(w, batch_file(1),
                                                                purpose=file_pb2.FILE_PURPOSE_BATCH_OUTPUT),
         lambda w: http_call(w, "POST", "/v1/files", data=form(batch_file(1), purpose="batch_output")),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PURPOSE", 400, "purpose"),
    Case("a file over the size limit", lambda w: grpc_upload(w, batch_file(40)),
         lambda w: http_call(w, "POST", "/v1/files", data=form(batch_file(40))), grpc.StatusCode.INVALID_ARGUMENT,
         "FILE_TOO_LARGE", 413, "file"),
    Case("an unsupported endpoint", lambda w: grpc_create(w, endpoint="/v1/images/generations"),
         lambda w: http_create(w, endpoint="/v1/images/generations"), grpc.StatusCode.INVALID_ARGUMENT,
         "UNSUPPORTED_ENDPOINT", 400, "endpoint"),
    Case("an endpoint the file does not target", lambda w: grpc_create(w, endpoint="/v1/embeddings"),
         lambda w: http_create(w, endpoint="/v1/embeddings"), grpc.StatusCode.INVALID_ARGUMENT,
         "ENDPOINT_MISMATCH", 400, "endpoint"),
    Case("a completion window of 1h", lambda w: grpc_create(w, completion_window="1h"),
         lambda w: http_create(w, completion_window="1h"), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_COMPLETION_WINDOW", 400, "completion_window"),
    Case("17 metadata pairs", lambda w: grpc_create(w, metadata=META), lambda w: http_create(w, metadata=META),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METADATA", 400, "metadata"),
    Case("a model name of 300 characters", lambda w: grpc_create(w, model="m" * 300),
         lambda w: http_create(w, model="m" * 300), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL", 400, "model"),
    Case("an unknown model", lambda w: grpc_create(w, model="no-such-model"),
         lambda w: http_create(w, model="no-such-model"), grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NOT_FOUND", 400),
    Case("cancelling an ended batch", g_ended_batch("CancelBatch", "alice"),
         h_call("POST", "/v1/batches/{batch_id}/cancel"), grpc.StatusCode.FAILED_PRECONDITION, "BATCH_ALREADY_ENDED",
         409),
    Case("a request id reused for another batch", grpc_reuse, http_reuse, grpc.StatusCode.FAILED_PRECONDITION,
         "REQUEST_ID_REUSED", 409),
]


async def _drain(stream) -> None:
    async for _ in stream:
        pass


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_grpc(world, case: Case):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await case.grpc_call(world)
    info, _ = error_details(caught.value)
    assert (caught.value.code(), info.reason) == (case.code, case.reason)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_http(world, case: Case):
    status, body = await case.http_call(world)
    error = body["error"]
    assert (status, error["code"], error["batchgate"]["reason"]) == (case.status, case.reason.lower(), case.reason)
    assert error["message"] and error["type"] in ("invalid_request_error", "authentication_error")
    if case.param is not None:
        assert error["param"] == case.param, json.dumps(error)


# -- the gRPC hostile table's uploads, over HTTP ---------------------------------------------------

HOSTILE_UPLOADS = [case for case in hostile.CASES if case.content is not None]


@pytest.fixture(scope="module")
async def limited(tmp_path_factory) -> AsyncIterator[World]:
    """A server with the hostile table's limits, so that its cases mean the same here."""
    async with serving(tmp_path_factory.mktemp("hostile-http") / "data", http_address="127.0.0.1:0",
                       max_chunk_bytes=hostile.MAX_CHUNK, max_file_bytes=hostile.MAX_FILE,
                       max_file_lines=hostile.MAX_LINES) as h:
        async with aiohttp.ClientSession() as http:
            yield World(h, http, "", "")


def hostile_params():
    for case in HOSTILE_UPLOADS:
        reason = hostile.PENDING_FIXES.get(case.name) or hostile.NEW_BUGS.get(case.name)
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
        yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", hostile_params())
async def test_http_hostile_upload(limited: World, case: hostile.Case):
    status, body = await http_call(limited, "POST", "/v1/files", data=form(case.content))
    error = body["error"]
    assert (status, error["batchgate"]["reason"], error["code"]) == (400, case.reason, case.reason.lower())
    fields = [v["field"] for v in error["batchgate"]["violations"]]
    assert case.field in fields, fields[:10]
    assert error["param"] == fields[0]
    if case.says is not None:
        assert case.says.lower() in error["message"].lower(), error["message"][:300]


def test_the_hostile_table_has_uploads_to_share():
    assert len(HOSTILE_UPLOADS) >= 30
