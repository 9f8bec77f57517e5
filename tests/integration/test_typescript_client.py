"""The TypeScript client (clients/typescript) run with node against the real server: upload from bytes
and from a path, create, watch and resume, download, and typed errors decoded from the google.rpc
details in grpc-status-details-bin (reason, domain, metadata, JSONL lines)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import batch_file, free_port, start_harness, stop_harness
from tests.integration.batch_helpers import write_config
from tests.typescript_build import build

REQUESTS = 5


@pytest.fixture(scope="module")
def built() -> Path:
    return build()


def request_line(i: int) -> str:
    """The line test/e2e.ts builds (JSON.stringify: no spaces)."""
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "simulated", "messages": [{"role": "user", "content": f"question {i}"}]}},
                      separators=(",", ":"))


def node_env(harness) -> dict[str, str]:
    key = dict(harness.alice.metadata)["authorization"].removeprefix("Bearer ")
    return {**os.environ, "BATCHGATE_ADDRESS": f"127.0.0.1:{harness.port}", "BATCHGATE_API_KEY": key}


async def run_node(script: Path, harness, **env: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**node_env(harness), **env})
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def download(harness, file_id: str) -> bytes:
    data = b""
    async for message in harness.alice.files.DownloadFile(file_pb2.DownloadFileRequest(file_id=file_id),
                                                          metadata=harness.alice.metadata):
        data += message.data
    return data


async def test_upload_watch_download_and_typed_errors(harness, built):
    report = await run_node(built / "test" / "e2e.js", harness, E2E_REQUESTS=str(REQUESTS))
    content = "".join(request_line(i) + "\n" for i in range(REQUESTS)).encode()

    # Uploads: the server stored exactly the bytes sent, for alice, from memory and from disk alike.
    digest = hashlib.sha256(content).hexdigest()
    assert report["file"] == {"id": report["file"]["id"], "bytes": str(len(content)), "lineCount": str(REQUESTS),
                              "sha256": digest}
    assert report["fromDisk"]["sha256"] == digest and report["fromDisk"]["id"] != report["file"]["id"]
    assert await download(harness, report["file"]["id"]) == content

    # Watch: revisions only grow, the last state is the terminal one; a watch resumed after the first
    # revision sends nothing at or before it (the batch has ended, so just its final state).
    states = report["states"]
    revisions = [int(s["revision"]) for s in states]
    assert revisions == sorted(set(revisions)) and states[-1]["status"] == "COMPLETED"
    assert report["batch"]["finalStatus"] == "COMPLETED" and states[-1]["completed"] == str(REQUESTS)
    assert report["resumeFrom"] == states[0]["revision"] and len(states) > 1
    assert report["resumed"] and all(int(r) > int(report["resumeFrom"]) for r in report["resumed"])
    assert report["resumed"][-1] == states[-1]["revision"]

    # Download: every request answered by the simulated model, as the server has it.
    results = report["results"]
    assert sorted(r["customId"] for r in results) == [f"req-{i}" for i in range(REQUESTS)]
    assert all(r["content"].startswith("[simulated]") for r in results)
    output = await download(harness, report["batch"]["outputFileId"])
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(
        r["customId"] for r in results)

    # Typed errors, decoded from grpc-status-details-bin.
    bad = report["badFile"]
    assert bad["type"] == "InvalidArgumentError" and report["typed"]["badFileIsInvalidArgument"]
    assert (bad["code"], bad["reason"], bad["reasonName"], bad["domain"]) == (
        "INVALID_ARGUMENT", "INVALID_BATCH_FILE", "INVALID_BATCH_FILE", "batchgate.dev")
    assert bad["lines"][0] == 2 and set(bad["lines"]) == {2, 3}
    assert bad["violations"][0]["description"].startswith("invalid_json_line:")
    assert bad["metadata"]["first_problem"] == "invalid_json_line"
    assert bad["message"].startswith("INVALID_ARGUMENT INVALID_BATCH_FILE: the batch file has")

    missing = report["missing"]
    assert (missing["type"], missing["code"], missing["reason"]) == ("NotFoundError", "NOT_FOUND", "FILE_NOT_FOUND")
    assert missing["metadata"] == {"file_id": "file-does-not-exist"}

    unfinished = report["unfinished"]
    assert (unfinished["code"], unfinished["reason"]) == ("INVALID_ARGUMENT", "UPLOAD_NOT_FINISHED")
    assert unfinished["reasonEnum"] == 9  # ErrorReason.UPLOAD_NOT_FINISHED in error_reason.proto

    # createBatch passes modelMap and spread (and leaves endpoint to the file).
    assert report["mapped"] == {"model": "simulated", "endpoint": "/v1/chat/completions",
                                "provider": "openai_compatible"}
    assert (report["reused"]["reason"], report["reused"]["metadata"]["field"]) == ("REQUEST_ID_REUSED", "spread")
    unmapped = report["unmapped"]
    assert (unmapped["type"], unmapped["reason"], unmapped["metadata"]["model"]) == (
        "InvalidArgumentError", "MODEL_NOT_FOUND", "no-such-model")
    assert unmapped["violations"] == [{"field": "model_map[simulated]",
                                       "description": "lines " + ", ".join(map(str, range(1, REQUESTS + 1)))
                                       + ": no deployment serves model 'no-such-model'"}]


async def test_a_watch_resumes_after_the_last_revision_when_the_server_restarts(tmp_path, built):
    """The server goes away while node watches a running batch and comes back on the same port: the
    watch reconnects by itself, from the last revision it saw (no state twice), to the batch's end."""
    port, data = free_port(), tmp_path / "data"
    config = write_config(tmp_path / "models.yaml", [{"model_name": "steady", "litellm_params": {
        "model": "simulated/echo", "latency_ms": 700, "max_concurrency": 1}}])
    h = await start_harness(data, address=f"127.0.0.1:{port}", config_file=config)
    try:
        f = await h.upload(h.alice, batch_file(4))
        batch = (await h.alice.batches.CreateBatch(batch_pb2.CreateBatchRequest(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", model="steady"),
            metadata=h.alice.metadata)).batch
        proc = await asyncio.create_subprocess_exec("node", str(built / "test" / "watch.js"), batch.id,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=node_env(h))
        before = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))]
        assert before[0]["status"] != "COMPLETED"
        await stop_harness(h)
        h = await start_harness(data, address=f"127.0.0.1:{port}", config_file=config)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()
    finally:
        await stop_harness(h)
    after = [json.loads(line) for line in out.splitlines()]
    revisions = [int(state["revision"]) for state in before + after]
    assert after and revisions == sorted(set(revisions)), revisions
    assert after[-1]["status"] == "COMPLETED" and after[-1]["completed"] == "4"


async def test_the_readme_typescript_example_runs(harness, built, tmp_path):
    """README "TypeScript": the example as written (it is plain JavaScript too), importing the built client
    from a checkout, with requests.jsonl beside it."""
    from tests.readme import section

    example = section("### TypeScript").split("```ts\n", 1)[1].split("```", 1)[0]
    (tmp_path / "clients" / "typescript").mkdir(parents=True)
    (tmp_path / "clients" / "typescript" / "dist").symlink_to(built)
    (tmp_path / "clients" / "typescript" / "node_modules").symlink_to(built.parent / "node_modules")
    (tmp_path / "example.mjs").write_text(example)
    (tmp_path / "requests.jsonl").write_bytes(batch_file(3))
    proc = await asyncio.create_subprocess_exec("node", "example.mjs", cwd=tmp_path, env=node_env(harness),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[-2] == "COMPLETED 3n" and lines[-1] == "[ 1 ]", lines


async def test_a_download_resumes_after_the_last_byte_when_the_server_restarts(tmp_path, built):
    """The server stops mid-download (3 MB: more than HTTP/2's flow-control windows hold, so the stream
    breaks) and starts again: node asks for the rest from the offset it reached and gets the file whole."""
    port, data = free_port(), tmp_path / "data"
    h = await start_harness(data, address=f"127.0.0.1:{port}")
    try:
        content = batch_file(30_000)
        f = await h.upload(h.alice, content)
        proc = await asyncio.create_subprocess_exec("node", str(built / "test" / "download.js"), f.id,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=node_env(h))
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"first\n"
        await stop_harness(h)
        h = await start_harness(data, address=f"127.0.0.1:{port}")
        out, err = await asyncio.wait_for(proc.communicate(b"go\n"), 90)
        assert proc.returncode == 0, err.decode()
    finally:
        await stop_harness(h)
    assert json.loads(out) == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
