"""The server as operators run it: key management, open mode, graceful shutdown."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from batchgate.v1 import file_pb2, file_pb2_grpc
from tests.conftest import batch_file, start_harness, upload_requests

SERVER = str(Path(sys.executable).with_name("batchgate-server"))


async def test_open_mode_binds_loopback_only_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="batchgate_server.app")
    h = await start_harness(tmp_path / "data", master_key="", address="0.0.0.0:0")
    try:
        assert h.server.auth.open
        assert any("loopback only (127.0.0.1:0)" in r.getMessage() for r in caplog.records)
        # No key needed in open mode; everything lands in the default project.
        f = (await h.anonymous.files.UploadFile(upload_requests(batch_file(1)))).file
        assert f.line_count == 1
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


def test_keys_create_then_authenticate_then_sigterm(tmp_path):
    data = tmp_path / "data"
    out = subprocess.run([SERVER, "keys", "create", "--project", "team-a", "--data-dir", str(data)],
                         capture_output=True, text=True, check=True).stdout
    secret = re.search(r"api_key: (\S+)", out).group(1)
    assert secret.startswith("bg-")
    stored = subprocess.run(["sqlite3", str(data / "batchgate.sqlite3"), "select key_hash from api_keys"],
                            capture_output=True, text=True)
    if stored.returncode == 0:
        assert secret not in stored.stdout, "only the hash is stored"

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "BATCHGATE_MASTER_KEY"}
    proc = subprocess.Popen([SERVER, "--address", f"127.0.0.1:{port}", "--data-dir", str(data)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            files = file_pb2_grpc.FileServiceStub(channel)
            f = files.UploadFile(upload_requests(batch_file(2)),
                                 metadata=(("authorization", f"Bearer {secret}"),)).file
            assert f.line_count == 2
            with pytest.raises(grpc.RpcError) as err:
                files.ListFiles(file_pb2.ListFilesRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log = proc.stderr.read()
    assert code == 0, log
    assert "shutting down" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(data: Path, port: int) -> subprocess.Popen:
    """A server with a master key (so it may listen as asked), ready to answer."""
    proc = subprocess.Popen([SERVER, "--address", f"127.0.0.1:{port}", "--data-dir", str(data)],
                            env={**os.environ, "BATCHGATE_MASTER_KEY": "k"}, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc


def _refused(data: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([SERVER, "--address", f"127.0.0.1:{port}", "--data-dir", str(data)],
                          env={**os.environ, "BATCHGATE_MASTER_KEY": "k"}, capture_output=True, text=True,
                          timeout=30)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_a_second_server_on_a_data_dir_in_use_refuses_to_start_and_names_the_holder(tmp_path):
    data = tmp_path / "data"
    first = _serve(data, _free_port())
    try:
        second = _refused(data, _free_port())
        assert second.returncode == 3, second.stderr
        assert f"data directory {data} is in use by another batchgate-server (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first server keeps running"
    finally:
        _stop(first)
    # The lock goes with its holder: the data directory is free again, even after a kill -9.
    again = _serve(data, _free_port())
    again.kill()
    again.wait(timeout=30)
    _stop(_serve(data, _free_port()))


def test_a_port_in_use_is_an_error(tmp_path):
    port = _free_port()
    first = _serve(tmp_path / "a", port)
    try:
        second = _refused(tmp_path / "b", port)
        assert second.returncode == 3, second.stderr
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        _stop(first)


def test_keys_create_on_a_full_disk_says_so(tmp_path, small_disk):
    data = small_disk.root / "data"
    subprocess.run([SERVER, "keys", "create", "--project", "p", "--data-dir", str(data)], capture_output=True,
                   check=True)
    (data / "batchgate.sqlite3-reserve").unlink()  # no space reserve to fall back on
    small_disk.fill()
    full = subprocess.run([SERVER, "keys", "create", "--project", "p", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=60)
    assert full.returncode == 1, full.stderr
    assert "batchgate-server: the disk is full" in full.stderr and "Traceback" not in full.stderr


def test_a_server_restarted_on_a_full_disk_serves_reads_and_deletes(tmp_path, small_disk):
    data = small_disk.root / "data"
    port = _free_port()
    first = _serve(data, port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        files = file_pb2_grpc.FileServiceStub(channel)
        kept = files.UploadFile(upload_requests(batch_file(500)), metadata=(("authorization", "Bearer k"),)).file
    _stop(first)
    small_disk.fill()  # SQLite must create its WAL and shared-memory files again to open the database

    again = _serve(data, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            files = file_pb2_grpc.FileServiceStub(channel)
            auth = (("authorization", "Bearer k"),)
            assert files.GetFile(file_pb2.GetFileRequest(file_id=kept.id), metadata=auth).file.bytes == kept.bytes
            with pytest.raises(grpc.RpcError) as err:
                files.UploadFile(upload_requests(batch_file(500)), metadata=auth)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            files.DeleteFile(file_pb2.DeleteFileRequest(file_id=kept.id), metadata=auth)
            assert list(files.ListFiles(file_pb2.ListFilesRequest(), metadata=auth).files) == []
    finally:
        _stop(again)


def test_the_readme_server_command_runs_as_written(tmp_path):
    """README "Running the server": its command, from a checkout (examples/ beside it), on another port;
    a batch on examples/models.yaml's `echo` completes, priced at zero."""
    from batchgate import BatchgateClient, BatchStatus, CostStatus
    from tests.readme import sh_blocks

    command = sh_blocks("## Running the server")[0].strip()
    assert command.startswith(".venv/bin/batchgate-server ") and "--config examples/models.yaml" in command
    port = _free_port()
    argv = command.replace(".venv/bin/batchgate-server", SERVER).replace(":50051", f":{port}").split()
    (tmp_path / "examples").symlink_to(Path(__file__).resolve().parents[2] / "examples")
    env = {k: v for k, v in os.environ.items() if k != "BATCHGATE_MASTER_KEY"}  # as a first run has it
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with BatchgateClient(f"127.0.0.1:{port}") as bg:
            grpc.channel_ready_future(bg.channel).result(timeout=30)
            f = bg.upload_file(batch_file(3), filename="requests.jsonl")
            done = bg.wait(bg.create_batch(f.id, "/v1/chat/completions", model="echo").id)
            assert done.status is BatchStatus.COMPLETED and done.request_counts.completed == 3
            assert done.cost.status == CostStatus.KNOWN and done.cost.amount == "0"
    finally:
        _stop(proc)
    assert (tmp_path / "data" / "batchgate.sqlite3").exists(), "--data-dir ./data, relative to where it runs"
