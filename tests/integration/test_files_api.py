"""FileService against the real server through the generated stubs."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import pytest
from google.protobuf import duration_pb2

from batchgate.v1 import file_pb2
from batchgate_server.domain.shards import MAX_FILE_GROUPS
from tests.backends import stored_blobs, uploads_in_flight
from tests.conftest import UPLOAD_FINISH, batch_file, error_details, jsonl, request_line, upload_requests


def blob_files(h) -> list:
    return stored_blobs(h.data_dir)


async def test_upload_records_validation_facts(harness):
    content = batch_file(3)
    f = await harness.upload(harness.alice, content, filename="in.jsonl")
    assert f.id.startswith("file-")
    assert f.filename == "in.jsonl"
    assert f.purpose == file_pb2.FILE_PURPOSE_BATCH
    assert f.bytes == len(content)
    assert f.sha256 == hashlib.sha256(content).hexdigest()
    assert f.line_count == 3
    assert f.endpoint == "/v1/chat/completions"
    assert f.model == "gpt-4o-mini"
    assert f.created_at.seconds > 0
    assert not f.HasField("expires_at")
    assert [(g.endpoint, g.model, g.count, list(g.first_lines)) for g in f.groups] == [
        ("/v1/chat/completions", "gpt-4o-mini", 3, [1, 2, 3])]


async def test_a_mixed_file_is_stored_with_its_groups(harness):
    """Issue 14: a file may mix endpoints and models; File.groups counts its lines by both."""
    a = harness.alice
    lines = [request_line(f"c{i}", model="gpt-4o-mini" if i % 4 else "gpt-4o") for i in range(30)]
    lines[5:5] = [request_line(f"e{i}", url="/v1/embeddings", model="text-embedding-3-small") for i in range(12)]
    content = jsonl(lines)
    f = await harness.upload(a, content, chunk_size=97)
    assert (f.line_count, f.endpoint, f.model) == (42, "", "")
    assert [(g.endpoint, g.model, g.count, list(g.first_lines)) for g in f.groups] == [
        ("/v1/chat/completions", "gpt-4o", 8, [1, 5, 21, 25, 29, 33, 37, 41]),
        ("/v1/chat/completions", "gpt-4o-mini", 22, [2, 3, 4, 18, 19, 20, 22, 23, 24, 26]),
        ("/v1/embeddings", "text-embedding-3-small", 12, list(range(6, 16))),
    ]
    # Read back from the store, not only the upload's answer.
    assert (await a.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=a.metadata)).file == f
    listed = (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files
    assert [x.groups for x in listed] == [f.groups]


async def test_get_list_download_delete_round_trip(harness):
    a = harness.alice
    content = batch_file(50)
    f = await harness.upload(a, content, chunk_size=1000)
    got = (await a.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=a.metadata)).file
    assert got == f

    chunks = [m async for m in a.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=f.id),
                                                       metadata=a.metadata)]
    assert chunks[0].file.id == f.id
    assert b"".join(m.data for m in chunks) == content
    assert [m.offset for m in chunks] == [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]

    listed = (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files
    assert [x.id for x in listed] == [f.id]

    deleted = await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=a.metadata)
    assert deleted.deleted and deleted.file_id == f.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=a.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert blob_files(harness) == []


async def test_download_honours_offset_and_limit(harness):
    a = harness.alice
    content = batch_file(200)
    f = await harness.upload(a, content)

    async def fetch(offset: int, limit: int) -> bytes:
        stream = a.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=f.id, read_offset=offset,
                                                                   read_limit=limit), metadata=a.metadata)
        return b"".join([m.data async for m in stream])

    assert await fetch(100, 0) == content[100:]
    assert await fetch(100, 50) == content[100:150]
    assert await fetch(len(content), 0) == b""
    # Resume: the first part plus the rest from where it stopped is the whole file.
    assert await fetch(0, 777) + await fetch(777, 0) == content
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(len(content) + 1, 0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(err.value)[0].reason == "INVALID_RANGE"


async def test_list_paginates_newest_first_and_binds_token_to_filter(harness):
    a = harness.alice
    ids = [(await harness.upload(a, batch_file(1))).id for _ in range(7)]
    seen, token = [], ""
    while True:
        page = await a.files.ListFiles(file_pb2.ListFilesRequest(page_size=3, page_token=token),
                                       metadata=a.metadata)
        assert len(page.files) <= 3
        seen += [f.id for f in page.files]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))

    first = await a.files.ListFiles(file_pb2.ListFilesRequest(page_size=3), metadata=a.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.files.ListFiles(file_pb2.ListFilesRequest(page_size=3, page_token=first.next_page_token,
                                                          purpose=file_pb2.FILE_PURPOSE_BATCH_OUTPUT),
                                metadata=a.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(err.value)[0].reason == "PAGE_TOKEN_FILTER_MISMATCH"
    import base64

    deep = base64.urlsafe_b64encode(b"[" * 1500).decode()  # nests deeper than json can parse
    for token in ("garbage!", deep, "x" * 5000):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.files.ListFiles(file_pb2.ListFilesRequest(page_token=token), metadata=a.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(err.value)[0].reason == "INVALID_PAGE_TOKEN"


async def test_projects_are_isolated(harness):
    f = await harness.upload(harness.alice, batch_file(2))
    b = harness.bob
    for call in (
        b.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=b.metadata),
        b.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=b.metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info, _ = error_details(err.value)
        assert info.reason == "FILE_NOT_FOUND" and info.metadata["file_id"] == f.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in b.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=f.id), metadata=b.metadata):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await b.files.ListFiles(file_pb2.ListFilesRequest(), metadata=b.metadata)).files == []
    # The master key sees every project's files.
    admin = harness.admin
    assert (await admin.files.GetFile(file_pb2.GetFileRequest(file_id=f.id), metadata=admin.metadata)).file.id == f.id
    # Alice still has it: Bob's delete did nothing.
    assert (await harness.alice.files.GetFile(file_pb2.GetFileRequest(file_id=f.id),
                                              metadata=harness.alice.metadata)).file.id == f.id


@pytest.mark.parametrize("metadata, reason", [
    ((), "MISSING_API_KEY"),
    ((("authorization", "Bearer nope"),), "INVALID_API_KEY"),
    ((("authorization", "Basic abc"),), "MALFORMED_API_KEY"),
])
async def test_bad_credentials_are_unauthenticated(harness, metadata, reason):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.alice.files.ListFiles(file_pb2.ListFilesRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err.value)[0].reason == reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.alice.files.UploadFile(upload_requests(batch_file(1)), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_request_id_replays_the_same_upload(harness):
    a = harness.alice
    content = batch_file(2)
    first = await harness.upload(a, content, request_id="upload-1")
    assert await harness.upload(a, content, request_id="upload-1") == first
    assert await harness.upload(a, content, request_id="upload-1", chunk_size=7) == first
    # With expected_sha256 the replay is answered before the content is read.
    assert await harness.upload(a, content, request_id="upload-1",
                                expected_sha256=hashlib.sha256(content).hexdigest()) == first
    other_project = await harness.upload(harness.bob, batch_file(5), request_id="upload-1")
    assert other_project.id != first.id and other_project.line_count == 5
    assert len(blob_files(harness)) == 2


REUSED_REQUEST_IDS = {
    "other_bytes": ({"content": batch_file(5)}, "content"),
    "a_longer_file": ({"content": batch_file(2) + batch_file(3)[-100:]}, "content"),
    "other_expected_sha256": ({"expected_sha256": "0" * 64}, "content"),
    "other_expected_bytes": ({"expected_bytes": 1}, "content"),
    "other_filename": ({"filename": "other.jsonl"}, "filename"),
    "other_expires_after": ({"expires_after": duration_pb2.Duration(seconds=60)}, "expires_after"),
    "no_expires_after": ({"expires_after": None}, "expires_after"),
    "filename_and_bytes": ({"filename": "other.jsonl", "content": batch_file(3)}, "filename,content"),
}


@pytest.mark.parametrize("case", sorted(REUSED_REQUEST_IDS))
async def test_request_id_reused_for_another_upload_is_refused(harness, case):
    a = harness.alice
    first = await harness.upload(a, batch_file(2), filename="in.jsonl", request_id="upload-1",
                                 expires_after=duration_pb2.Duration(seconds=3600))
    changes, differs = REUSED_REQUEST_IDS[case]
    fields = {"content": batch_file(2), "filename": "in.jsonl", "expires_after": duration_pb2.Duration(seconds=3600),
              **changes}
    if fields["expires_after"] is None:
        del fields["expires_after"]
    content = fields.pop("content")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.upload(a, content, request_id="upload-1", **fields)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(err.value)
    assert info.reason == "REQUEST_ID_REUSED"
    assert info.metadata["file_id"] == first.id and info.metadata["differs"] == differs
    assert first.id in err.value.details() and "new request_id" in err.value.details()
    assert [f.id for f in (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files] \
        == [first.id]
    assert len(blob_files(harness)) == 1 and temp_files(harness) == []


async def test_expected_size_and_sha256_are_checked(harness):
    content = batch_file(3)
    good = await harness.upload(harness.alice, content, expected_bytes=len(content),
                                expected_sha256=hashlib.sha256(content).hexdigest())
    assert good.bytes == len(content)
    for fields, reason in [
        ({"expected_bytes": len(content) + 1}, "SIZE_MISMATCH"),
        ({"expected_bytes": len(content) - 1}, "SIZE_MISMATCH"),
        ({"expected_sha256": "0" * 64}, "SHA256_MISMATCH"),
        ({"expected_sha256": "XYZ"}, "INVALID_SHA256"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await harness.upload(harness.alice, content, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert error_details(err.value)[0].reason == reason
    assert len(blob_files(harness)) == 1


BAD_HEADERS = [
    ({"filename": ""}, "INVALID_FILENAME"),
    ({"filename": "x" * 256}, "INVALID_FILENAME"),
    ({"filename": "😀" * 256}, "INVALID_FILENAME"),
    ({"filename": "a\x00b.jsonl"}, "INVALID_FILENAME"),
    ({"filename": "a\nb.jsonl"}, "INVALID_FILENAME"),
    ({"filename": "\x1b[31mred.jsonl"}, "INVALID_FILENAME"),
    ({"filename": "a\x7f.jsonl"}, "INVALID_FILENAME"),
    ({"filename": "a\x85.jsonl"}, "INVALID_FILENAME"),
    ({"purpose": file_pb2.FILE_PURPOSE_UNSPECIFIED}, "INVALID_PURPOSE"),
    ({"purpose": file_pb2.FILE_PURPOSE_BATCH_OUTPUT}, "INVALID_PURPOSE"),
    ({"request_id": "r" * 129}, "INVALID_REQUEST_ID"),
    ({"expires_after": duration_pb2.Duration(seconds=31 * 24 * 3600)}, "INVALID_EXPIRES_AFTER"),
    ({"expires_after": duration_pb2.Duration(seconds=-5)}, "INVALID_EXPIRES_AFTER"),
    ({"expires_after": duration_pb2.Duration(seconds=10**14)}, "INVALID_EXPIRES_AFTER"),
    ({"expires_after": duration_pb2.Duration(nanos=999_999_999)}, "INVALID_EXPIRES_AFTER"),
    ({"expires_after": duration_pb2.Duration(nanos=1)}, "INVALID_EXPIRES_AFTER"),
    ({"expires_after": duration_pb2.Duration(seconds=30 * 24 * 3600, nanos=1)}, "INVALID_EXPIRES_AFTER"),
]


async def test_filenames_count_characters_not_bytes(harness):
    for name in ("😀" * 255, "x" * 255, "données été.jsonl", "a b\tc.jsonl".replace("\t", " ")):
        assert (await harness.upload(harness.alice, batch_file(1), filename=name)).filename == name


@pytest.mark.parametrize("fields, reason", BAD_HEADERS, ids=[r for _, r in BAD_HEADERS])
async def test_bad_header_is_invalid_argument(harness, fields, reason):
    kwargs = {"filename": "in.jsonl", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.upload(harness.alice, batch_file(1), **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info.reason == reason
    assert bad is not None and bad.field_violations


@pytest.mark.parametrize("seconds", [1, 30 * 24 * 3600], ids=["1s", "30d"])
async def test_expires_after_accepts_both_edges(harness, seconds):
    f = await harness.upload(harness.alice, batch_file(1), expires_after=duration_pb2.Duration(seconds=seconds))
    assert f.expires_at.seconds - f.created_at.seconds in (seconds, seconds + 1)


async def test_stream_protocol_errors(harness):
    a = harness.alice

    async def call(messages):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.files.UploadFile(iter(messages), metadata=a.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return error_details(err.value)[0].reason

    header = file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
        filename="a.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH))
    chunk = file_pb2.UploadFileRequest(chunk=batch_file(1))
    assert await call([]) == "MISSING_UPLOAD_HEADER"
    assert await call([chunk]) == "MISSING_UPLOAD_HEADER"
    assert await call([UPLOAD_FINISH]) == "MISSING_UPLOAD_HEADER"
    assert await call([header, chunk, header]) == "UNEXPECTED_UPLOAD_HEADER"
    assert await call([header, file_pb2.UploadFileRequest(chunk=b"x" * (2 * 1024 * 1024 + 1))]) == "CHUNK_TOO_LARGE"
    assert await call([header, chunk, UPLOAD_FINISH, chunk]) == "MESSAGE_AFTER_FINISH"
    assert await call([header, chunk, UPLOAD_FINISH, UPLOAD_FINISH]) == "MESSAGE_AFTER_FINISH"
    assert await call([header, chunk]) == "UPLOAD_NOT_FINISHED"
    assert blob_files(harness) == []
    assert (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files == []


async def test_a_message_with_no_payload_is_named_as_such(harness):
    a = harness.alice
    messages = list(upload_requests(batch_file(1)))
    messages.insert(1, file_pb2.UploadFileRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.files.UploadFile(iter(messages), metadata=a.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info.reason == "EMPTY_UPLOAD_MESSAGE"
    assert "message 2 of the upload is empty" in err.value.details()
    assert "none of header, chunk or finish" in err.value.details()


async def test_a_half_closed_upload_without_finish_stores_nothing(harness):
    """Whole lines, then the client half-closes without the finish message: refused, and the
    message says how to finish an upload."""
    a = harness.alice
    messages = [m for m in upload_requests(batch_file(200), chunk_size=4096) if m.WhichOneof("payload") != "finish"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.files.UploadFile(iter(messages), metadata=a.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info.reason == "UPLOAD_NOT_FINISHED"
    assert "finish" in err.value.details() and "nothing was stored" in err.value.details()
    assert bad.field_violations[0].field == "finish"
    await wait_until_no_upload_runs(harness)
    assert blob_files(harness) == [] and temp_files(harness) == []
    assert (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files == []


def temp_files(h) -> list:
    return uploads_in_flight(h.data_dir)


async def wait_until_no_upload_runs(h, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while h.server.files.uploads_in_progress() or temp_files(h):
        assert loop.time() < deadline, "an upload is still running"
        await asyncio.sleep(0.01)


async def test_cancelled_or_timed_out_uploads_never_commit(harness):
    """40 calls that stop after whole lines -- cancelled, past their deadline, or half-closed and
    cancelled at once -- at varied moments: none of them ever becomes a file."""
    a = harness.alice
    content = batch_file(400)
    lines = content.splitlines(keepends=True)
    chunks = [b"".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]
    outcomes = set()
    end_of_test = asyncio.Event()  # lets the client's request generators end (grpc keeps consuming them)
    for attempt in range(40):
        sent_lines = (attempt % len(chunks)) + 1
        sent = asyncio.Event()
        half_close = attempt % 3 == 2

        async def messages():
            yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
                filename="cut.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH))
            for chunk in chunks[:sent_lines]:
                yield file_pb2.UploadFileRequest(chunk=chunk)
            sent.set()
            if not half_close:
                await end_of_test.wait()  # the call is cancelled or times out long before

        if attempt % 3 == 1:
            call = a.files.UploadFile(messages(), metadata=a.metadata, timeout=0.05 + 0.01 * (attempt % 7))
        else:
            call = a.files.UploadFile(messages(), metadata=a.metadata)
            await sent.wait()
            for _ in range(attempt % 4):  # cancel a varying number of loop turns later
                await asyncio.sleep(0)
            call.cancel()
        try:
            await call
            outcomes.add("committed")
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        except grpc.aio.AioRpcError as err:
            outcomes.add(err.code().name)
    end_of_test.set()
    assert "committed" not in outcomes
    await wait_until_no_upload_runs(harness)
    assert blob_files(harness) == [] and temp_files(harness) == []
    assert (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files == []


def _line(**overrides) -> bytes:
    line = request_line("a")
    line.update(overrides)
    return json.dumps(line).encode()


# One case per rule: (content, problem code, line number of the first problem).
BAD_FILES = {
    "empty_file": (b"", "empty_file", 0),
    "invalid_utf8": (_line() + b"\n" + b'{"custom_id": "\xff\xfe"}\n', "invalid_utf8", 2),
    "invalid_json": (_line() + b"\n{not json\n", "invalid_json_line", 2),
    "not_an_object": (b"[1, 2]\n", "invalid_json_line", 1),
    "blank_line_in_middle": (_line() + b"\n\n" + _line(custom_id="b") + b"\n", "invalid_json_line", 2),
    "missing_custom_id": (json.dumps({"method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": "m"}}).encode(), "missing_custom_id", 1),
    "duplicate_custom_id": (_line() + b"\n" + _line() + b"\n", "duplicate_custom_id", 2),
    "wrong_method": (_line(method="GET"), "invalid_method", 1),
    "unsupported_url": (_line(url="/v1/images/edits"), "unsupported_url", 1),
    "body_not_object": (_line(body="hi"), "invalid_body", 1),
    "missing_model": (_line(body={"messages": []}), "missing_model", 1),
    "too_many_groups": (jsonl([request_line(f"r{i}", model=f"m{i}") for i in range(MAX_FILE_GROUPS + 1)]),
                        "too_many_groups", MAX_FILE_GROUPS + 1),
    "unpaired_surrogate_in_model": (_line() + b"\n" + _line(custom_id="b").replace(b'"gpt-4o-mini"', b'"\\ud800"'),
                                    "unpaired_surrogate", 2),
    "unpaired_surrogate_in_custom_id": (_line(custom_id="x\udc00"), "unpaired_surrogate", 1),
    "custom_id_too_long": (_line(custom_id="c" * 513), "custom_id_too_long", 1),
    "model_too_long": (_line(body={"model": "m" * 257}), "model_too_long", 1),
    "byte_order_mark": (b"\xef\xbb\xbf" + _line(), "invalid_json_line", 1),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
async def test_each_validation_rule_rejects_with_line_number(harness, case):
    content, code, line = BAD_FILES[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.upload(harness.alice, content, chunk_size=7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info.reason == "INVALID_BATCH_FILE"
    assert info.metadata["first_problem"] == code
    first = bad.field_violations[0]
    assert first.field == (f"line {line}" if line else "file")
    assert first.description.startswith(code)
    assert blob_files(harness) == [], "a rejected upload leaves nothing behind"


async def test_a_huge_model_is_refused_and_nothing_is_stored(harness):
    """A 4.5 MB body.model used to be stored (then GetFile, DownloadFile and ListFiles failed)."""
    a = harness.alice
    content = jsonl([request_line("a", model="m" * 4_500_000)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.upload(a, content, chunk_size=1024 * 1024)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info.metadata["first_problem"] == "model_too_long" and bad.field_violations[0].field == "line 1"
    assert len(err.value.details()) < 300
    assert (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files == []
    assert blob_files(harness) == []


async def test_limits_on_lines_and_bytes(tmp_path):
    from tests.conftest import start_harness

    h = await start_harness(tmp_path / "d", max_file_lines=5, max_file_bytes=4000)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.upload(h.alice, batch_file(6))
        info, bad = error_details(err.value)
        assert info.metadata["first_problem"] == "too_many_tasks"
        assert bad.field_violations[0].field == "line 6"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.upload(h.alice, jsonl([request_line("x", content="y" * 5000)]), chunk_size=1024)
        assert error_details(err.value)[0].reason == "FILE_TOO_LARGE"
        assert blob_files(h) == []
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_first_twenty_problems_and_total_count(harness):
    lines = [_line(custom_id=f"id-{i}", method="GET") for i in range(25)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.upload(harness.alice, b"\n".join(lines))
    info, bad = error_details(err.value)
    assert info.metadata["total_problems"] == "25"
    assert len(bad.field_violations) == 20
    assert [v.field for v in bad.field_violations] == [f"line {i}" for i in range(1, 21)]


@pytest.mark.local_stores  # watches the temporary file on local disk (S3 buffers a small part in memory)
async def test_interrupted_upload_leaves_no_file_and_no_temp_data(harness):
    a = harness.alice
    sent = asyncio.Event()

    async def messages():
        yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
            filename="big.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH))
        yield file_pb2.UploadFileRequest(chunk=batch_file(100))
        sent.set()
        await asyncio.sleep(30)  # the client goes away mid-upload

    call = a.files.UploadFile(messages(), metadata=a.metadata)
    await sent.wait()
    await asyncio.sleep(0.2)
    assert temp_files(harness), "the upload is being written"
    call.cancel()
    for _ in range(50):
        if not temp_files(harness):
            break
        await asyncio.sleep(0.05)
    assert temp_files(harness) == []
    assert blob_files(harness) == []
    assert (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files == []


async def test_expired_files_are_swept(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(1), expires_after=duration_pb2.Duration(seconds=1))
    keep = await harness.upload(a, batch_file(1))
    assert f.expires_at.seconds >= f.created_at.seconds + 1
    await asyncio.sleep(1.1)
    assert await harness.server.files.sweep_expired() == 1
    ids = [x.id for x in (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files]
    assert ids == [keep.id]
    assert len(blob_files(harness)) == 1


async def test_large_upload_200mb(harness, tmp_path):
    """A 200 MB batch file streams through with validation and comes back byte for byte."""
    a = harness.alice
    line_template = request_line("x", content="lorem ipsum dolor sit amet " * 150)
    path = tmp_path / "big.jsonl"
    target = 200 * 1024 * 1024 - 64 * 1024
    h = hashlib.sha256()
    lines = 0
    with open(path, "wb") as fh:
        size = 0
        while True:
            line_template["custom_id"] = f"req-{lines}"
            data = json.dumps(line_template).encode() + b"\n"
            if size + len(data) > target:
                break
            fh.write(data)
            h.update(data)
            size += len(data)
            lines += 1

    def chunks():
        yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
            filename="big.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH, expected_bytes=size,
            expected_sha256=h.hexdigest()))
        with open(path, "rb") as fin:
            while data := fin.read(1024 * 1024):
                yield file_pb2.UploadFileRequest(chunk=data)
        yield UPLOAD_FINISH

    f = (await a.files.UploadFile(chunks(), metadata=a.metadata)).file
    assert f.bytes == size and f.line_count == lines and f.sha256 == h.hexdigest()
    back = hashlib.sha256()
    total = 0
    async for m in a.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=f.id), metadata=a.metadata):
        back.update(m.data)
        total += len(m.data)
    assert total == size and back.hexdigest() == f.sha256


async def test_concurrent_uploads_with_one_request_id_make_one_file(harness):
    """Both uploads pass the replay check before either commits; the second commit loses the
    race on the unique index and answers with the winner's file -- or refuses when its content
    is another."""
    a = harness.alice
    results = await asyncio.gather(*[harness.upload(a, batch_file(400), request_id="same-upload", chunk_size=4096)
                                     for _ in range(4)])
    assert len({f.id for f in results}) == 1
    assert len(blob_files(harness)) == 1
    listed = (await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)).files
    assert [f.id for f in listed] == [results[0].id]

    results = await asyncio.gather(*[harness.upload(a, batch_file(400 + i), request_id="other-upload",
                                                    chunk_size=4096) for i in range(2)], return_exceptions=True)
    (winner,) = [r for r in results if isinstance(r, file_pb2.File)]
    (loser,) = [r for r in results if not isinstance(r, file_pb2.File)]
    assert loser.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(loser)[0].metadata["file_id"] == winner.id
    assert len(blob_files(harness)) == 2


async def test_expiry_sweep_spares_the_input_of_a_running_batch(tmp_path):
    from tests.conftest import start_harness
    from tests.integration.batch_helpers import upstream_entry, watch_all, write_config
    from tests.fakes.openai_compatible_upstream import FakeUpstream
    from batchgate.v1 import batch_pb2

    up = FakeUpstream()
    await up.start()
    h = await start_harness(tmp_path / "d", config_file=write_config(tmp_path / "m.yaml", [
        upstream_entry("slow", up.base_url)]))
    try:
        a = h.alice
        content = jsonl([request_line(f"s{i}", model="slow", content=f"SLOW:1500 s{i}") for i in range(3)])
        f = await h.upload(a, content, expires_after=duration_pb2.Duration(seconds=1))
        batch = (await a.batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
            metadata=a.metadata)).batch
        await asyncio.sleep(1.1)
        assert await h.server.files.sweep_expired() == 0, "still read by the running batch"
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 3
        assert await h.server.files.sweep_expired() == 1, "gone once the batch has ended"
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)
        await up.stop()


def _held_upload(release: asyncio.Event, *, send_chunk: bool = True, finish: bool = True):
    """An upload that sends its header (and a chunk), then waits for `release` before its finish
    message (or before just ending, without `finish`)."""
    async def messages():
        yield file_pb2.UploadFileRequest(header=file_pb2.UploadFileHeader(
            filename="held.jsonl", purpose=file_pb2.FILE_PURPOSE_BATCH))
        if send_chunk:
            yield file_pb2.UploadFileRequest(chunk=batch_file(2))
        await release.wait()
        if finish:
            yield UPLOAD_FINISH
    return messages()


async def test_an_idle_upload_is_aborted_and_cleaned_up(tmp_path):
    from tests.conftest import start_harness

    h = await start_harness(tmp_path / "d", upload_idle_timeout=0.3)
    end_of_test = asyncio.Event()  # lets the silent clients' generators end
    try:
        a = h.alice
        for send_chunk in (True, False):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await a.files.UploadFile(_held_upload(end_of_test, send_chunk=send_chunk, finish=False),
                                         metadata=a.metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            info, _ = error_details(err.value)
            assert info.reason == "UPLOAD_IDLE_TIMEOUT" and info.metadata["idle_timeout_seconds"] == "0.3"
            await wait_until_no_upload_runs(h)
            assert temp_files(h) == [] and blob_files(h) == []
        # Nor one that sends finish but never ends its stream: nothing is committed before the end.
        async def finished_but_open():
            for message in upload_requests(batch_file(2)):
                yield message
            await end_of_test.wait()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.files.UploadFile(finished_but_open(), metadata=a.metadata, timeout=30)
        assert error_details(err.value)[0].reason == "UPLOAD_IDLE_TIMEOUT"
        await wait_until_no_upload_runs(h)
        assert blob_files(h) == []
        # A stream that never even sends its header is not held forever either.
        async def nothing():
            await end_of_test.wait()
            return
            yield
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.files.UploadFile(nothing(), metadata=a.metadata, timeout=30)
        assert error_details(err.value)[0].reason == "UPLOAD_IDLE_TIMEOUT"
        # Uploads that keep sending are not cut.
        assert (await h.upload(a, batch_file(3))).line_count == 3
    finally:
        end_of_test.set()
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_concurrent_uploads_per_project_are_capped(tmp_path):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from tests.conftest import start_harness

    h = await start_harness(tmp_path / "d", max_uploads_per_project=2)
    try:
        a = h.alice
        release = asyncio.Event()
        held = [a.files.UploadFile(_held_upload(release), metadata=a.metadata) for _ in range(2)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while h.server.files.uploads_in_progress("alice") < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.upload(a, batch_file(1))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, _ = error_details(err.value)
        assert info.reason == "TOO_MANY_UPLOADS" and info.metadata["max_uploads"] == "2"
        retry = [d for d in rpc_status.from_call(err.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retry) == 1
        assert (await h.upload(h.bob, batch_file(1))).line_count == 1, "the cap is per project"

        release.set()
        assert [(await call).file.line_count for call in held] == [2, 2]
        assert h.server.files.uploads_in_progress("alice") == 0
        assert (await h.upload(a, batch_file(1))).line_count == 1, "a slot frees once an upload ends"
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


@pytest.mark.parametrize("offset", [0, "end"])
async def test_a_file_whose_bytes_are_gone_is_a_failed_precondition_not_an_empty_download(harness, offset):
    a = harness.alice
    f = await harness.upload(a, batch_file(2))
    assert await harness.server.files.blobs.delete(f.id)  # lost behind the server's back
    request = file_pb2.DownloadFileRequest(file_id=f.id, read_offset=f.bytes if offset == "end" else 0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [m async for m in a.files.DownloadFile(request, metadata=a.metadata)]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(err.value)
    assert (info.reason, info.metadata["file_id"]) == ("FILE_CONTENT_MISSING", f.id)


# Files the validator's one-call reading of a chunk's lines once took for valid (sent in one chunk).
ONE_CHUNK_BAD_FILES = {
    # an object over two lines (the second starting with "{") beside two objects on one line
    "object_over_two_lines": (_line().replace(b'"body": {', b'"body":\n{', 1) + b"\n"
                              + _line(custom_id="b") + _line(custom_id="c") + b"\n"),
    # an integer longer than Python's int() converts, in a member the rules do not read
    "integer_past_int_limit": (_line(custom_id="b") + b"\n"
                               + _line(body={"model": "m", "seed": 1}).replace(b'"seed": 1', b'"seed": ' + b"9" * 4301)
                               + b"\n"),
}


@pytest.mark.parametrize("case", sorted(ONE_CHUNK_BAD_FILES))
async def test_hostile_lines_read_in_one_chunk_are_rejected(harness, case):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.upload(harness.alice, ONE_CHUNK_BAD_FILES[case])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info.reason == "INVALID_BATCH_FILE"
    assert info.metadata["first_problem"] == "invalid_json_line"
    assert blob_files(harness) == []
