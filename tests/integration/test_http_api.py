"""The OpenAI-compatible HTTP API driven by the official openai Python SDK, unchanged but for base_url
and api_key; raw HTTP (aiohttp) where an SDK would not send it: cut uploads, Range, SSE."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types import Batch, FileDeleted, FileObject

from batchgate_server.app import BatchgateServer
from tests.conftest import batch_file, free_port, jsonl, make_settings, request_line, serving
from tests.integration.batch_helpers import write_config

FIELDS_OURS = {"batchgate"}


def slow_model_config(tmp_path: Path) -> Path:
    """A model list with "slow": a simulated model whose every request takes a minute."""
    return write_config(tmp_path / "models.yaml", [
        {"model_name": "slow", "litellm_params": {"model": "simulated/slow", "latency_ms": 60_000}}])


async def slow_batch(client: openai.AsyncOpenAI) -> Batch:
    """A batch of one request on "slow" (slow_model_config): it runs for a minute."""
    f = await upload(client, batch_file(1, model="slow"))
    return await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def sdk(h, caller_or_key) -> openai.AsyncOpenAI:
    key = caller_or_key if isinstance(caller_or_key, str) else caller_or_key.api_key
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.server.http_port}/v1", api_key=key, max_retries=0)


def url(h, path: str) -> str:
    return f"http://127.0.0.1:{h.server.http_port}{path}"


def auth(caller) -> dict[str, str]:
    return {"Authorization": f"Bearer {caller.api_key}"}


async def upload(client: openai.AsyncOpenAI, content: bytes, name: str = "in.jsonl") -> FileObject:
    return await client.files.create(file=(name, io.BytesIO(content)), purpose="batch")


def assert_openai_fields(raw: dict, model) -> None:
    """Every field of OpenAI's model, and nothing else but our nested object."""
    assert set(raw) == set(model.model_fields) | FIELDS_OURS


async def test_files_through_the_openai_sdk(http_harness):
    h = http_harness
    async with sdk(h, h.alice) as client:
        content = batch_file(3, model="simulated")
        f = await upload(client, content)
        assert (f.object, f.purpose, f.status, f.bytes, f.filename) == ("file", "batch", "processed", len(content),
                                                                        "in.jsonl")
        raw = (await client.files.with_raw_response.retrieve(f.id)).http_response.json()
        assert_openai_fields(raw, FileObject)
        assert raw["batchgate"]["line_count"] == 3 and raw["batchgate"]["model"] == "simulated"
        assert (await client.files.retrieve(f.id)).id == f.id
        assert [x.id async for x in client.files.list()] == [f.id]
        assert [x.id async for x in client.files.list(purpose="batch_output")] == []
        assert (await client.files.content(f.id)).content == content
        expiring = await client.files.create(file=("e.jsonl", io.BytesIO(content)), purpose="batch",
                                             expires_after={"anchor": "created_at", "seconds": 3600})
        assert expiring.expires_at - expiring.created_at in (3599, 3600, 3601)
        await client.files.delete(expiring.id)
        deleted = await client.files.delete(f.id)
        assert isinstance(deleted, FileDeleted) and deleted.deleted and deleted.id == f.id
        with pytest.raises(openai.NotFoundError) as caught:
            await client.files.retrieve(f.id)
        assert caught.value.status_code == 404 and caught.value.code == "file_not_found"
        assert f.id in caught.value.message


async def test_a_batch_through_the_openai_sdk_runs_to_completion(http_harness):
    h = http_harness
    async with sdk(h, h.alice) as client:
        f = await upload(client, batch_file(4))
        batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h", metadata={"team": "search"},
                                            extra_body={"model": "simulated"})  # LiteLLM's optional model
        assert (batch.object, batch.status, batch.model, batch.metadata) == ("batch", "validating", "simulated",
                                                                             {"team": "search"})
        async with aiohttp.ClientSession() as http:
            async with http.get(url(h, f"/v1/batches/{batch.id}/events"), headers=auth(h.alice)) as response:
                body = await response.text()  # the stream ends after the terminal state
        final = await client.batches.retrieve(batch.id)
        assert final.status == "completed" and f"id: {final.model_extra['batchgate']['revision']}" in body
        assert final.request_counts.total == 4 and final.request_counts.completed == 4
        assert final.usage.total_tokens > 0 and final.completed_at >= final.created_at
        raw = (await client.batches.with_raw_response.retrieve(batch.id)).http_response.json()
        assert_openai_fields(raw, Batch)
        Batch.model_validate(raw)
        assert raw["batchgate"]["provider"] == "openai_compatible" and raw["batchgate"]["cost"]["status"]
        lines = (await client.files.content(final.output_file_id)).text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in lines) == [f"req-{i}" for i in range(4)]
        assert [b.id async for b in client.batches.list()] == [batch.id]


async def test_cancel_through_the_openai_sdk(tmp_path):
    config = slow_model_config(tmp_path)
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", config_file=config) as h:
        async with sdk(h, h.alice) as client:
            f = await upload(client, batch_file(2, model="slow"))
            batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
            cancelled = await client.batches.cancel(batch.id)
            assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(url(h, f"/v1/batches/{batch.id}/events"), headers=auth(h.alice)) as response:
                    await response.read()
            assert (await client.batches.retrieve(batch.id)).status == "cancelled"
            with pytest.raises(openai.ConflictError) as caught:
                await client.batches.cancel(batch.id)
            assert caught.value.status_code == 409 and caught.value.code == "batch_already_ended"
            # The SDK would retry a 409 on its own; this one cannot succeed by asking again.
            assert caught.value.response.headers["x-should-retry"] == "false"


async def test_pagination_with_after_as_the_sdk_pages(http_harness):
    h = http_harness
    async with sdk(h, h.alice) as client:
        ids = [(await upload(client, batch_file(1, model="simulated"), f"f{i}.jsonl")).id for i in range(5)]
        first = await client.files.list(limit=2)
        assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
        assert [f.id async for f in client.files.list(limit=2)] == ids[::-1]  # the SDK follows `after`
        assert [f.id async for f in client.files.list(limit=2, order="asc")] == ids
        page = await client.files.list(limit=2, after=ids[2])
        assert [f.id for f in page.data] == [ids[1], ids[0]] and not page.has_more
        raw = (await client.files.with_raw_response.list(limit=2)).http_response.json()
        assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == ("list", ids[4], ids[3], True)

        batches = [(await client.batches.create(input_file_id=i, endpoint="/v1/chat/completions",
                                                completion_window="24h")).id for i in ids[:3]]
        assert [b.id async for b in client.batches.list(limit=1)] == batches[::-1]
        assert [b.id for b in (await client.batches.list(after=batches[1])).data] == [batches[0]]


async def test_errors_reach_the_sdk_exception_classes(tmp_path):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", max_file_bytes=2048) as h:
        async with sdk(h, h.alice) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await upload(client, jsonl([request_line("a")]) + b"{not json\n")
            err = caught.value
            assert err.status_code == 400 and err.code == "invalid_batch_file" and err.param == "line 2"
            assert err.body["line"] == 2 and err.body["type"] == "invalid_request_error"
            assert err.body["batchgate"]["reason"] == "INVALID_BATCH_FILE"
            assert "line 2" in err.message

            with pytest.raises(openai.APIStatusError) as caught:
                await upload(client, batch_file(40))
            assert caught.value.status_code == 413 and caught.value.code == "file_too_large"

            with pytest.raises(openai.BadRequestError) as caught:
                await client.files.create(file=("in.jsonl", io.BytesIO(batch_file(1))), purpose="fine-tune")
            assert caught.value.code == "invalid_purpose" and caught.value.param == "purpose"

            with pytest.raises(openai.BadRequestError) as caught:
                await client.batches.create(input_file_id="file-x", endpoint="/v1/images", completion_window="24h")
            assert caught.value.code == "unsupported_endpoint" and caught.value.param == "endpoint"

        async with sdk(h, "bg-wrong") as stranger:
            with pytest.raises(openai.AuthenticationError) as caught:
                await stranger.files.list()
            assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


async def test_too_many_uploads_is_429_with_retry_after(tmp_path):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", max_uploads_per_project=0) as h:
        async with sdk(h, h.alice) as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await upload(client, batch_file(1))
        assert caught.value.status_code == 429 and caught.value.code == "too_many_uploads"
        assert caught.value.response.headers["Retry-After"] == "1"


async def test_idempotency_key_replays_the_upload_and_the_batch(http_harness):
    h = http_harness
    async with sdk(h, h.alice) as client:
        content = batch_file(2, model="simulated")
        first = await client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch",
                                          extra_headers={"Idempotency-Key": "upload-1"})
        again = await client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch",
                                          extra_headers={"Idempotency-Key": "upload-1"})
        assert again.id == first.id
        create = dict(input_file_id=first.id, endpoint="/v1/chat/completions", completion_window="24h",
                      extra_headers={"Idempotency-Key": "batch-1"})
        assert (await client.batches.create(**create)).id == (await client.batches.create(**create)).id
        with pytest.raises(openai.ConflictError) as caught:
            await client.batches.create(**create, metadata={"other": "batch"})
        assert caught.value.code == "request_id_reused"


# -- raw HTTP: what the SDKs never send ---------------------------------------------------------

def multipart(content: bytes, *, boundary: str = "b0undary", fields_after: bool = False,
              close: bool = True) -> bytes:
    purpose = f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode()
    file_part = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
                 f"Content-Type: application/jsonl\r\n\r\n").encode() + content + b"\r\n"
    body = file_part + purpose if fields_after else purpose + file_part
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


async def post_multipart(h, body: bytes, boundary: str = "b0undary") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url(h, "/v1/files"), data=body, headers={
                **auth(h.alice), "Content-Type": f"multipart/form-data; boundary={boundary}"}) as response:
            return response.status, await response.json()


async def stored_files(h) -> list:
    return await h.server.store.list_files(None, None, 100, None)


async def test_an_upload_cut_mid_body_stores_nothing(http_harness, caplog):
    h = http_harness
    caplog.set_level(logging.ERROR)
    body = multipart(batch_file(2000, model="simulated"))
    reader, writer = await asyncio.open_connection("127.0.0.1", h.server.http_port)
    writer.write((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {h.alice.api_key}\r\n"
                  f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {len(body)}\r\n\r\n"
                  ).encode() + body[:len(body) // 2])
    await writer.drain()
    while h.server.files.uploads_in_progress() == 0:
        await asyncio.sleep(0.01)
    writer.close()  # the client goes away half way
    while h.server.files.uploads_in_progress():
        await asyncio.sleep(0.01)
    assert await stored_files(h) == []
    assert not list(h.data_dir.rglob("*.part")) and [key async for key in h.server.files.blobs.keys()] == []
    assert not caplog.records, "a client that goes away is no server error"


async def test_a_body_without_its_closing_boundary_stores_nothing(http_harness):
    h = http_harness
    status, body = await post_multipart(h, multipart(batch_file(2, model="simulated"), close=False))
    assert status == 400 and body["error"]["code"] == "malformed_multipart"
    assert await stored_files(h) == []


async def test_fields_after_the_file_are_read_before_anything_is_stored(http_harness):
    h = http_harness
    content = batch_file(2, model="simulated")
    status, body = await post_multipart(h, multipart(content, fields_after=True))  # the node SDK's order
    assert status == 200 and body["bytes"] == len(content) and body["purpose"] == "batch"
    refused = [
        (multipart(content, fields_after=True).replace(b"\r\n\r\nbatch\r\n", b"\r\n\r\nfine-tune\r\n"),
         "invalid_purpose"),
        (multipart(content).replace(b'name="purpose"', b'name="other"'), "invalid_purpose"),  # no purpose at all
        (multipart(content, close=False) + multipart(content), "multiple_files"),
    ]
    for data, code in refused:
        status, body = await post_multipart(h, data)
        assert (status, body["error"]["code"]) == (400, code), data[-300:]
    assert len(await stored_files(h)) == 1


async def test_hostile_multipart_bodies_are_400(http_harness):
    h = http_harness
    async with aiohttp.ClientSession() as http:
        for content_type, data, code in [
            ("application/json", b"{}", "invalid_content_type"),
            ("multipart/form-data", b"x", "malformed_multipart"),  # no boundary
            ("multipart/form-data; boundary=zz", b"garbage", "malformed_multipart"),
            ("multipart/form-data; boundary=b0undary",
             b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + b"x" * 5000 + b"\r\n",
             "field_too_long"),
            ("multipart/form-data; boundary=b0undary",  # a raw control character in a part header
             b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a\x07b"\r\n\r\nx\r\n',
             "malformed_multipart"),
            ("multipart/form-data; boundary=b0undary",  # a part header of 100 KB
             b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="' + b"a" * 100_000 + b'"\r\n',
             "malformed_multipart"),
            ("multipart/form-data; boundary=b0undary",  # a part without a name
             b'--b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0undary--\r\n', "missing_file"),
            ("multipart/form-data; boundary=b0undary",
             b"".join(b'--b0undary\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i
                      for i in range(17)), "too_many_fields"),
            ("multipart/form-data; boundary=b0undary",
             b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n\xff\r\n', "invalid_field"),
            ("multipart/form-data; boundary=b0undary",
             b'--b0undary\r\nContent-Disposition: form-data; name="expires_after[anchor]"\r\n\r\nnow\r\n'
             b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\nx\r\n',
             "invalid_expires_after"),
        ]:
            async with http.post(url(h, "/v1/files"), data=data,
                                 headers={**auth(h.alice), "Content-Type": content_type}) as response:
                assert (response.status, (await response.json())["error"]["code"]) == (400, code), content_type


async def test_content_with_range(http_harness):
    h = http_harness
    content = batch_file(3, model="simulated")
    async with sdk(h, h.alice) as client:
        f = await upload(client, content)
    async with aiohttp.ClientSession() as http:
        for header, status, expected in [("bytes=0-9", 206, content[:10]), ("bytes=-5", 206, content[-5:]),
                                         ("bytes=10-", 206, content[10:]), ("items=1-2", 200, content)]:
            async with http.get(url(h, f"/v1/files/{f.id}/content"), headers={**auth(h.alice), "Range": header}) as r:
                assert (r.status, await r.read()) == (status, expected), header
                if status == 206:
                    assert r.headers["Content-Range"].endswith(f"/{len(content)}")
        for unsatisfiable in (f"bytes={len(content)}-", "bytes=9-3", "bytes=-0"):
            async with http.get(url(h, f"/v1/files/{f.id}/content"),
                                headers={**auth(h.alice), "Range": unsatisfiable}) as r:
                assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(content)}", unsatisfiable
                assert (await r.json())["error"]["code"] == "requested_range_not_satisfiable"
        async with http.get(url(h, f"/v1/files/{f.id}/content"),
                            headers={**auth(h.alice), "Range": f"bytes=5-{10 * len(content)}"}) as r:
            assert (r.status, await r.read()) == (206, content[5:])  # a last byte past the end: the end
        async with http.post(url(h, "/v1/files"), data=b"x", headers={
                **auth(h.alice), "Content-Type": f"multipart/form-data; boundary={'b' * 71}"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "malformed_multipart")


async def test_sse_watch_resumes_after_last_event_id_and_sends_heartbeats(tmp_path):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", config_file=slow_model_config(tmp_path),
                       heartbeat_interval=0.05) as h:
        async with sdk(h, h.alice) as client:
            batch = await slow_batch(client)
        events = url(h, f"/v1/batches/{batch.id}/events")
        async with aiohttp.ClientSession() as http:
            async with http.get(events, headers=auth(h.alice)) as response:
                assert response.headers["Content-Type"] == "text/event-stream"
                lines = []
                while not any(line.startswith(": heartbeat") for line in lines):
                    lines.append((await response.content.readline()).decode().rstrip("\n"))
            ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
            assert ids and "event: batch" in lines
            state = json.loads(next(line[6:] for line in lines if line.startswith("data: ")))
            assert state["id"] == batch.id and state["batchgate"]["revision"] == ids[0]
            # Resuming at the last revision seen: no state again, only what comes next.
            async with http.get(events, headers={**auth(h.alice), "Last-Event-ID": str(ids[-1])}) as response:
                first = (await response.content.readline()).decode()
                assert first.startswith(": heartbeat revision="), first
                async with sdk(h, h.alice) as client:
                    await client.batches.cancel(batch.id)
                rest = (await response.read()).decode()
            assert f"id: {ids[-1]}\n" not in rest and '"status": "cancelled"' in rest
            async with http.get(events, headers={**auth(h.alice), "Last-Event-ID": "x"}) as response:
                assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_start_revision"
            async with http.get(events, headers=auth(h.bob)) as response:
                assert response.status == 404 and (await response.json())["error"]["code"] == "batch_not_found"


async def test_unknown_routes_and_methods_answer_in_openai_shape(http_harness):
    h = http_harness
    async with aiohttp.ClientSession() as http:
        async with http.get(url(h, "/v1/nothing"), headers=auth(h.alice)) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.put(url(h, "/v1/files"), headers=auth(h.alice)) as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        async with http.post(url(h, "/v1/batches"), data=b"x" * 100_000,
                             headers={**auth(h.alice), "Content-Type": "application/json"}) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
        for body, code in [(b"[1]", "invalid_json"), (b"{", "invalid_json"), (b"\xff{}", "invalid_json"),
                           (b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "invalid_json"), (b'{"metadata": [1]}', "invalid_field_type"),
                           (b'{"input_file_id": 5}', "invalid_field_type"), (b'{"batchgate": 1}', "invalid_field_type"),
                           (b'{"input_file_id": "f", "endpoint": "/v1/chat/completions", "completion_window": "24h",'
                            b' "batchgate": {"provider": "' + b"p" * 65 + b'"}}', "invalid_provider"),
                           (b'{"output_expires_after": {"anchor": "created_at", "seconds": 3600}}',
                            "unsupported_parameter")]:
            async with http.post(url(h, "/v1/batches"), data=body,
                                 headers={**auth(h.alice), "Content-Type": "application/json"}) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (400, code), body


async def test_without_any_key_http_binds_loopback_only(tmp_path):
    server = BatchgateServer(make_settings(tmp_path / "data", master_key="", address="0.0.0.0:0",
                                           http_address="0.0.0.0:0"))
    await server.start()
    try:
        assert server.auth.open
        assert [host for host, _ in server._http.addresses] == ["127.0.0.1"]
    finally:
        await server.stop(grace=0)


async def test_http_is_off_by_default(harness):
    assert harness.server.http_port == 0 and harness.server.settings.http_address == ""


async def test_an_http_address_in_use_is_a_clear_start_up_error(http_harness, tmp_path):
    taken = f"127.0.0.1:{http_harness.server.http_port}"
    server = BatchgateServer(make_settings(tmp_path / "other", http_address=taken))
    try:
        with pytest.raises(RuntimeError, match=f"could not listen on {taken} \\(HTTP\\)"):
            await server.start()
    finally:
        await server.stop(grace=0)


async def test_after_of_another_project_is_refused_like_an_unknown_id(http_harness):
    h = http_harness
    async with sdk(h, h.alice) as alice, sdk(h, h.bob) as bob:
        f = await upload(alice, batch_file(1, model="simulated"))
        batch = await alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        assert [x.id async for x in bob.files.list()] == [] and (await bob.batches.list()).data == []
        answers = []
        for after in (f.id, "file-unknown", batch.id, "batch_unknown"):
            listing = bob.batches.list if after.startswith("batch") else bob.files.list
            with pytest.raises(openai.BadRequestError) as caught:
                await listing(after=after)
            body = dict(caught.value.body)
            answers.append((caught.value.code, body.pop("message").replace(after, "ID"),
                            json.dumps(body).replace(after, "ID")))
        assert answers[0] == answers[1] and answers[2] == answers[3] and answers[0][0] == "invalid_after"
        with pytest.raises(openai.BadRequestError) as caught:
            await alice.files.list(limit=0)
        assert caught.value.code == "invalid_limit"


@pytest.mark.parametrize("sent", ["half the file", "the headers only"])
async def test_an_upload_that_stalls_times_out_and_stores_nothing(tmp_path, sent):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", upload_idle_timeout=0.3) as h:
        body = multipart(batch_file(50, model="simulated"))
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.http_port)
        writer.write((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {h.alice.api_key}\r\n"
                      f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {len(body)}\r\n\r\n"
                      ).encode() + (body[:len(body) // 2] if sent == "half the file" else b""))
        await writer.drain()  # … and nothing more
        status_line = await asyncio.wait_for(reader.readline(), 30)
        head_and_body = await reader.read(4096)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        assert b'"code": "upload_idle_timeout"' in head_and_body
        assert await stored_files(h) == [] and h.server.files.uploads_in_progress() == 0


def test_the_server_process_serves_http_from_its_environment_and_stops_on_sigterm(tmp_path):
    """As an operator runs it: BATCHGATE_HTTP_ADDRESS, a key, and SIGTERM while a watch is open."""
    import contextlib
    import http.client
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from bench._common import wait_port

    grpc_port, http_port = free_port(), free_port()
    config = slow_model_config(tmp_path)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("batchgate-server")), "--address", f"127.0.0.1:{grpc_port}",
         "--data-dir", str(tmp_path / "data"), "--heartbeat-interval", "60", "--config", str(config)],
        env={**os.environ, "BATCHGATE_MASTER_KEY": "process-key", "BATCHGATE_HTTP_ADDRESS": f"127.0.0.1:{http_port}"})
    try:
        wait_port(http_port, timeout=30)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="process-key", max_retries=0)
        f = client.files.create(file=("in.jsonl", io.BytesIO(batch_file(1, model="slow"))), purpose="batch")
        assert [x.id for x in client.files.list()] == [f.id]
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/batches/{batch.id}/events",
                                         headers={"Authorization": "Bearer process-key"})
        with urllib.request.urlopen(request, timeout=30) as events:
            assert events.headers["Content-Type"] == "text/event-stream"
            assert events.readline().startswith(b"id: ")  # the batch runs for a minute: the stream stays open
            proc.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            with contextlib.suppress(http.client.IncompleteRead):
                events.read()  # the server ends the stream as it shuts down …
        assert proc.wait(timeout=30) == 0
        # … at once, not after its 10 s grace period
        assert time.monotonic() - stopping < 8
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_a_resumed_watch_opens_at_once_without_waiting_for_a_change(tmp_path):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", config_file=slow_model_config(tmp_path),
                       heartbeat_interval=60) as h:
        async with sdk(h, h.alice) as client:
            batch = await slow_batch(client)
            while (state := await client.batches.retrieve(batch.id)).status != "in_progress":
                await asyncio.sleep(0.02)  # then nothing changes for a minute: each request takes that long
            revision = state.model_extra["batchgate"]["revision"]
        async with aiohttp.ClientSession() as http:
            request = http.get(url(h, f"/v1/batches/{batch.id}/events"),
                               headers={**auth(h.alice), "Last-Event-ID": str(revision)})
            response = await asyncio.wait_for(request.__aenter__(), 10)  # not the 60 s to the first heartbeat
            try:
                assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            finally:
                response.close()


async def test_uploads_reach_the_core_in_pieces_within_its_chunk_limit(tmp_path):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", max_chunk_bytes=64 * 1024) as h:
        content = batch_file(3000, model="simulated")  # about 500 KB: many pieces of at most 64 KiB
        async with sdk(h, h.alice) as client:
            f = await upload(client, content)
        assert f.bytes == len(content) and f.model_extra["batchgate"]["line_count"] == 3000


async def test_strings_that_are_no_text_are_refused_before_anything_is_stored(http_harness):
    """JSON can carry an unpaired surrogate escape and a header undecodable bytes; protobuf
    (the gRPC side) can carry neither. Refused, never stored, never a 500 for encoding them."""
    h = http_harness
    f = await h.upload(h.alice, batch_file(1, model="simulated"))
    create = '{"input_file_id": "%s", "endpoint": "/v1/chat/completions", "completion_window": "24h", %s}'
    async with aiohttp.ClientSession() as http:
        for extra, where in [('"metadata": {"k": "\\ud800"}', "metadata.k"), ('"metadata": {"\\udc00": "v"}', "key"),
                             ('"model": "\\ud800x"', "model")]:
            async with http.post(url(h, "/v1/batches"), data=create % (f.id, extra),
                                 headers={**auth(h.alice), "Content-Type": "application/json"}) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"]) == (400, "unpaired_surrogate") and where in error["message"], extra
        raw = (b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b0undary\r\n'
               b'Content-Disposition: form-data; name="file"; filename="\xff\xfe.jsonl"\r\n\r\n' +
               batch_file(1) + b"\r\n--b0undary--\r\n")
        status, body = await post_multipart(h, raw)
        assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_filename", "filename")
        async with http.get(url(h, "/v1/files/file-%ED%B0%80%FF"), headers=auth(h.alice)) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (404, "file_not_found")
    assert await h.server.store.list_batches(None, (), 10, None) == []
    assert [x.id for x in await stored_files(h)] == [f.id]


async def test_numbers_in_queries_and_headers_are_ascii_digits_or_refused(http_harness):
    h = http_harness
    f = await h.upload(h.alice, batch_file(1, model="simulated"))
    content = batch_file(1, model="simulated")
    async with aiohttp.ClientSession() as http:
        for query in ("limit=²", "limit=" + "9" * 5000, "limit=-1", "limit=1.5"):
            async with http.get(url(h, f"/v1/files?{query}"), headers=auth(h.alice)) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_limit"), query
        for last_event_id in ("²", "9" * 5000, "-1"):
            async with http.get(url(h, "/v1/batches/batch_x/events"),
                                headers={**auth(h.alice), "Last-Event-ID": last_event_id}) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_start_revision")
        for byte_range in ("bytes=²-", "bytes=" + "9" * 5000 + "-"):
            async with http.get(url(h, f"/v1/files/{f.id}/content"), headers={**auth(h.alice), "Range": byte_range}) as r:
                assert (r.status, await r.read()) == (200, content), byte_range  # not understood: the whole file
    data = multipart(content).replace(b"batch\r\n", b'batch\r\n--b0undary\r\nContent-Disposition: form-data; '
                                      b'name="expires_after[anchor]"\r\n\r\ncreated_at\r\n--b0undary\r\nContent-'
                                      b'Disposition: form-data; name="expires_after[seconds]"\r\n\r\n\xc2\xb2\r\n', 1)
    status, body = await post_multipart(h, data)
    assert (status, body["error"]["code"]) == (400, "invalid_expires_after")


async def test_a_key_of_any_bytes_is_an_invalid_key(http_harness):
    """gRPC metadata is ASCII; an HTTP header may hold any bytes (these were 500s)."""
    h = http_harness
    for value in (b"Bearer bg-\xc3\xa9", b"Bearer \xff\xfe", b"Bearer test-master-k\xc3\xa9y"):
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.http_port)
        writer.write(b"GET /v1/files HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + value + b"\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401") and b'"code": "invalid_api_key"' in answer, answer[:200]


async def test_an_idempotency_key_of_undecodable_bytes_is_refused(http_harness):
    """An HTTP header may carry bytes that are no UTF-8 (aiohttp decodes them to surrogates, which
    SQLite cannot bind: a 500 before the core refused them)."""
    h = http_harness
    f = await h.upload(h.alice, batch_file(1, model="simulated"))
    create = json.dumps({"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    body = multipart(batch_file(1, model="simulated"))
    for request, target in [(b"POST /v1/batches", create.encode()), (b"POST /v1/files", body)]:
        content_type = b"application/json" if target is not body else b"multipart/form-data; boundary=b0undary"
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.http_port)
        writer.write(request + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " +
                     h.alice.api_key.encode() + b"\r\nIdempotency-Key: k\xff\xfe\r\nContent-Type: " + content_type +
                     b"\r\nContent-Length: " + str(len(target)).encode() + b"\r\n\r\n" + target)
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400") and b'"code": "invalid_request_id"' in answer, answer[:300]
    assert await h.server.store.list_batches(None, (), 10, None) == []
    assert [x.id for x in await stored_files(h)] == [f.id]


async def test_create_takes_model_map_and_spread_and_needs_an_endpoint_for_a_single_endpoint_file(http_harness):
    h = http_harness
    async with sdk(h, h.alice) as client:
        f = await upload(client, batch_file(3, model="house-model"))
        # The file's model is known to no deployment: model_map routes it.
        batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h", extra_headers={"Idempotency-Key": "mapped"},
                                            extra_body={"model_map": {"house-model": "simulated"}, "spread": True})
        assert (batch.model, batch.endpoint) == ("simulated", "/v1/chat/completions")
        again = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h", extra_headers={"Idempotency-Key": "mapped"},
                                            extra_body={"model_map": {"house-model": "simulated"}, "spread": True})
        assert again.id == batch.id
        with pytest.raises(openai.APIStatusError) as caught:
            await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                        extra_headers={"Idempotency-Key": "mapped"},
                                        extra_body={"model_map": {"house-model": "x"}, "spread": True})
        assert caught.value.status_code == 409 and "model_map" in caught.value.message
    async with aiohttp.ClientSession() as http:
        async def create(**fields) -> tuple[int, dict]:
            body = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
            body = {k: v for k, v in body.items() if v is not None}
            async with http.post(url(h, "/v1/batches"), json=body, headers=auth(h.alice)) as r:
                return r.status, await r.json()

        for fields, code, param in [
            ({"spread": "yes"}, "invalid_field_type", "spread"),
            ({"model_map": ["house-model", "simulated"]}, "invalid_field_type", "model_map"),
            ({"model_map": {"house-model": 7}}, "invalid_field_type", "model_map"),
            ({"model_map": {f"m{i}": "simulated" for i in range(65)}}, "invalid_model_map", "model_map"),
            ({"model_map": {"house-model": "gpt-17"}}, "model_not_found", "model_map[house-model]"),
            # OpenAI's API needs the endpoint; only a file that mixes endpoints may leave it out
            ({"endpoint": None, "model_map": {"house-model": "simulated"}}, "missing_endpoint", "endpoint"),
            ({"endpoint": "", "model_map": {"house-model": "simulated"}}, "missing_endpoint", "endpoint"),
        ]:
            status, answer = await create(**fields)
            assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, code, param), fields
        status, answer = await create(model_map={"house-model": "simulated"}, spread=False)
        assert status == 200 and answer["model"] == "simulated"
