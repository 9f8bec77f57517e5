"""The `batchgate` command line as a user runs it: a subprocess against the real server (in-process
on a loopback port), configured by BATCHGATE_ADDRESS and BATCHGATE_API_KEY."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tomllib
from pathlib import Path

import pytest

from batchgate.cli import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_EXPIRED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
)
from tests.conftest import batch_file, jsonl, request_line, serving
from tests.integration.batch_helpers import write_config

ROOT = Path(__file__).resolve().parents[2]


def key_of(caller) -> str:
    return dict(caller.metadata)["authorization"].removeprefix("Bearer ")


def cli_env(harness, caller=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHGATE_")}
    env.update(BATCHGATE_ADDRESS=f"127.0.0.1:{harness.port}", BATCHGATE_API_KEY=key_of(caller or harness.alice))
    return env


@pytest.fixture(autouse=True)
def sigint_not_ignored():
    """A test run started in the background by a non-interactive shell ignores SIGINT, and a child
    inherits an ignored signal: the CLI would then never see the Ctrl-C these tests send it. A
    handler (unlike an ignore) is reset to the default action by exec, so with one installed here the
    CLI starts as from a terminal. (Not preexec_fn: forking through Python code runs gRPC's fork
    handlers, which can abort the child.)"""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, before)


async def start_cli(env: dict[str, str], *args: str, cwd: Path | None = None, stdin=asyncio.subprocess.DEVNULL):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgate", *args, env=env, cwd=cwd, stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await start_cli(env, *args, cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def cli_json(env: dict[str, str], *args: str) -> tuple[int, object]:
    code, out, err = await cli(env, *args, "--json")
    try:
        return code, json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (exit {code}): {out!r}; stderr {err!r}") from None


def test_the_console_script_is_declared():
    project = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    assert project["scripts"]["batchgate"] == "batchgate.cli:main"


async def test_run_uploads_runs_watches_and_downloads(harness, tmp_path):
    (tmp_path / "requests.jsonl").write_bytes(batch_file(200))
    code, out, err = await cli(cli_env(harness), "run", "requests.jsonl", "--model", "simulated",
                               "-o", "results.jsonl", cwd=tmp_path)
    assert code == EXIT_OK, err
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(200))
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert "completed: 200 completed, 0 failed of 200" in out and "output: results.jsonl" in out
    assert "uploaded requests.jsonl" in err and "completed" in err  # the progress went to stderr
    assert not (tmp_path / "results.errors.jsonl").exists()


async def test_run_json_summary_with_failures_by_code_exits_partial(tmp_path):
    config = write_config(tmp_path / "models.yaml", [{"model_name": "flaky", "litellm_params": {
        "model": "simulated/echo", "failure_rate": 0.3}}])
    async with serving(tmp_path / "data", config_file=config) as h:
        (tmp_path / "in.jsonl").write_bytes(batch_file(300, model="flaky"))
        code, out, progress = await cli(cli_env(h), "run", str(tmp_path / "in.jsonl"), "--model", "flaky",
                                        "-o", str(tmp_path / "out.jsonl"), "--json")
    summary = json.loads(out)
    assert code == EXIT_PARTIAL == summary["exit_code"]
    counts = summary["batch"]["request_counts"]
    assert summary["batch"]["status"] == "completed" and counts["total"] == 300
    failed = counts["failed"]
    assert 0 < failed < 300 and summary["failures_by_code"] == {"http_400": failed}
    assert summary["batch"]["failures"][0]["code"] == "http_400", "as the server's live summary names them"
    assert f"failed {failed:,} (http_400 {failed:,})" in progress.splitlines()[-1], "the bar shows them live"
    errors = (tmp_path / "out.errors.jsonl").read_text().splitlines()
    assert len(errors) == failed and summary["files"]["errors"] == str(tmp_path / "out.errors.jsonl")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 300 - failed


async def test_a_bad_file_is_refused_with_its_line_numbers(harness, tmp_path):
    lines = [json.dumps(request_line("ok-1")), "{not json", json.dumps({"method": "POST"}),
             json.dumps(request_line("ok-2"))]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    env = cli_env(harness)
    code, out, err = await cli(env, "run", "bad.jsonl", "--model", "simulated", cwd=tmp_path)
    assert code == EXIT_ERROR
    assert "INVALID_ARGUMENT INVALID_BATCH_FILE" in err
    assert "line 2: invalid_json_line" in err and "line 3: missing_custom_id" in err
    assert "what to do: fix lines 2, 3 of the file" in err
    code, parsed = await cli_json(env, "files", "upload", str(tmp_path / "bad.jsonl"))
    assert code == EXIT_ERROR
    error = parsed["error"]
    assert (error["code"], error["reason"], error["domain"]) == ("INVALID_ARGUMENT", "INVALID_BATCH_FILE",
                                                                 "batchgate.dev")
    assert sorted({v["line"] for v in error["violations"]}) == [2, 3]
    assert list(tmp_path.glob("*.jsonl")) == [tmp_path / "bad.jsonl"], "no results file for a refused upload"


async def test_files_and_batches_commands_round_trip_as_json(harness, tmp_path):
    env = cli_env(harness)
    (tmp_path / "in.jsonl").write_bytes(batch_file(20))
    code, f = await cli_json(env, "files", "upload", str(tmp_path / "in.jsonl"))
    assert code == EXIT_OK and f["line_count"] == 20 and f["purpose"] == "batch" and f["filename"] == "in.jsonl"
    assert f["created_at"].endswith("Z") and f["bytes"] == (tmp_path / "in.jsonl").stat().st_size
    assert (await cli_json(env, "files", "get", f["id"]))[1] == f
    assert [x["id"] for x in (await cli_json(env, "files", "ls"))[1]] == [f["id"]]

    code, b = await cli_json(env, "batches", "create", f["id"], "--model", "simulated", "--metadata", "team=qa")
    assert code == EXIT_OK and b["endpoint"] == "/v1/chat/completions" and b["metadata"] == {"team": "qa"}
    proc = await start_cli(env, "batches", "watch", b["id"], "--json")
    out, _ = await proc.communicate()
    states = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == EXIT_OK and states[-1]["status"] == "completed"
    assert [s["revision"] for s in states] == sorted({s["revision"] for s in states})
    code, listed = await cli_json(env, "batches", "ls", "--status", "completed")
    assert [x["id"] for x in listed] == [b["id"]] and listed[0]["request_counts"]["completed"] == 20
    assert (await cli_json(env, "batches", "ls", "--status", "in_progress"))[1] == []
    code, _, err = await cli(env, "batches", "ls", "--status", "running")
    assert code == EXIT_USAGE and "'running' is not one of unspecified, validating, failed, in_progress" in err

    output_id = states[-1]["output_file_id"]
    code, out, _ = await cli(env, "files", "download", output_id, "-o", "results.jsonl", cwd=tmp_path)
    assert code == EXIT_OK and len((tmp_path / "results.jsonl").read_text().splitlines()) == 20
    code, out, _ = await cli(env, "files", "download", output_id, "-o", "-")
    assert out == (tmp_path / "results.jsonl").read_text()

    code, out, err = await cli(env, "batches", "cancel", b["id"])  # it has ended: nothing to cancel
    assert code == EXIT_ERROR and "FAILED_PRECONDITION" in err and "what to do" in err
    assert (await cli(env, "files", "rm", f["id"]))[0] == EXIT_OK  # the input of an ended batch
    code, removed = await cli_json(env, "files", "rm", output_id)
    assert code == EXIT_OK and removed == [{"file_id": output_id, "deleted": True}]
    code, out, err = await cli(env, "files", "get", output_id)
    assert code == EXIT_ERROR and "NOT_FOUND FILE_NOT_FOUND" in err


async def test_files_get_lists_the_groups_of_a_mixed_file(harness, tmp_path):
    env = cli_env(harness)
    lines = [request_line("a"), request_line("b", url="/v1/embeddings", model="emb"), request_line("c")]
    (tmp_path / "mixed.jsonl").write_bytes(jsonl(lines))
    code, f = await cli_json(env, "files", "upload", str(tmp_path / "mixed.jsonl"))
    assert code == EXIT_OK and [(g["endpoint"], g["count"]) for g in f["groups"]] == [
        ("/v1/chat/completions", 2), ("/v1/embeddings", 1)]
    code, out, _ = await cli(env, "files", "get", f["id"])
    assert code == EXIT_OK
    assert "groups      2 /v1/chat/completions gpt-4o-mini\n            1 /v1/embeddings emb\n" in out


async def test_usage_table_is_grouped_as_asked(harness, tmp_path):
    env = cli_env(harness)
    (tmp_path / "in.jsonl").write_bytes(batch_file(10))
    assert (await cli(env, "run", "in.jsonl", "--model", "simulated", "--metadata", "team=search",
                      cwd=tmp_path))[0] == EXIT_OK
    code, out, err = await cli(env, "usage", "--by", "model,provider", "--by", "metadata:team", "--since", "1d")
    assert code == EXIT_OK, err
    header, row, total = out.splitlines()
    assert header.split()[:4] == ["MODEL", "PROVIDER", "METADATA.TEAM", "BATCHES"]
    assert row.split()[:4] == ["simulated", "openai_compatible", "search", "1"]
    assert total.split()[:2] == ["TOTAL", "1"]
    code, report = await cli_json(env, "usage", "--by", "model")
    assert [r["group"] for r in report["rows"]] == [{"model": "simulated"}]
    assert report["totals"]["batch_count"] == 1 and report["totals"]["input_tokens"] > 0
    code, out, err = await cli(env, "usage", "--by", "colour")
    assert code == EXIT_USAGE and "choose project, api_key, model, provider or metadata:KEY" in err
    code, out, err = await cli(env, "usage", "--since", "last tuesday")
    assert code == EXIT_USAGE and "neither an ISO 8601 time nor a span" in err
    code, out, err = await cli(env, "usage")
    assert code == EXIT_OK and out.split("\n")[1].split()[:2] == ["TOTAL", "1"]


async def test_command_line_mistakes_and_missing_keys(harness, tmp_path):
    env = cli_env(harness)
    assert (await cli(env, "run", "in.jsonl"))[0] == EXIT_USAGE  # no --model
    code, _, err = await cli(env, "run", str(tmp_path / "missing.jsonl"), "--model", "simulated")
    assert code == EXIT_ERROR and "no such file" in err
    code, _, err = await cli({**env, "BATCHGATE_API_KEY": "bg-wrong"}, "files", "ls")
    assert code == EXIT_ERROR and "UNAUTHENTICATED" in err and "BATCHGATE_API_KEY" in err
    code, _, err = await cli(env, "files", "ls", "--address", "127.0.0.1:1", "--timeout", "5")
    assert code == EXIT_ERROR and "UNAVAILABLE" in err and "is the server running" in err


@pytest.fixture
async def slow_harness(tmp_path):
    """A model slow enough that a batch is still running when the test interrupts its watcher."""
    config = write_config(tmp_path / "models.yaml", [{"model_name": "slow", "litellm_params": {
        "model": "simulated/slow", "latency_ms": 100, "max_concurrency": 2}}])
    async with serving(tmp_path / "data", config_file=config) as h:
        yield h


async def _interrupt_once_created(proc) -> str:
    """SIGINT once `run` has said it created the batch; returns the batch id."""
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        assert line, "the command ended before creating its batch"
        if line.startswith("created "):
            batch_id = line.split()[1]
            break
    await asyncio.wait_for(proc.stderr.readline(), 60)  # the first progress line: it is watching
    proc.send_signal(signal.SIGINT)
    return batch_id


async def test_ctrl_c_during_run_leaves_the_batch_running_and_says_how_to_resume(slow_harness, tmp_path):
    env = cli_env(slow_harness)
    (tmp_path / "in.jsonl").write_bytes(batch_file(400, model="slow"))
    proc = await start_cli(env, "run", "in.jsonl", "--model", "slow", "-o", "out.jsonl", cwd=tmp_path)
    batch_id = await _interrupt_once_created(proc)
    _, rest = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert f"batchgate batches watch {batch_id} -o out.jsonl" in rest.decode()
    code, state = await cli_json(env, "batches", "get", batch_id)
    assert state["status"] in ("in_progress", "validating"), "stdin is no terminal: nobody asked, it runs on"
    code, cancelled = await cli_json(env, "batches", "cancel", batch_id)
    assert cancelled["status"] in ("cancelling", "cancelled")
    proc = await start_cli(env, "batches", "watch", batch_id, "-o", "out.jsonl", cwd=tmp_path)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == EXIT_CANCELLED


async def test_ctrl_c_at_a_terminal_asks_and_cancels(slow_harness, tmp_path):
    import pty

    env = cli_env(slow_harness)
    (tmp_path / "in.jsonl").write_bytes(batch_file(400, model="slow"))
    controller, terminal = pty.openpty()
    try:
        proc = await start_cli(env, "run", "in.jsonl", "--model", "slow", "--json", cwd=tmp_path, stdin=terminal)
        batch_id = await _interrupt_once_created(proc)
        prompt = b""
        while b"[y/N]" not in prompt:
            prompt += await asyncio.wait_for(proc.stderr.read(100), 60)
        assert f"cancel batch {batch_id}?".encode() in prompt
        os.write(controller, b"y\n")
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == EXIT_CANCELLED
    summary = json.loads(out)
    assert summary["interrupted"] and summary["batch"]["status"] in ("cancelling", "cancelled")


async def test_cli_over_tls(tmp_path):
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    async with serving(tmp_path / "data", tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.pem") as h:
        env = cli_env(h)
        (tmp_path / "in.jsonl").write_bytes(jsonl([request_line("a")]))
        code, f = await cli_json(env, "--tls-ca", str(tmp_path / "ca.pem"), "files", "upload",
                                 str(tmp_path / "in.jsonl"))
        assert code == EXIT_OK and f["line_count"] == 1
        code, listed = await cli_json({**env, "BATCHGATE_TLS_CA": str(tmp_path / "ca.pem")}, "files", "ls")
        assert [x["id"] for x in listed] == [f["id"]]
        code, _, err = await cli(env, "files", "ls", "--timeout", "5")  # plaintext to a TLS server
        assert code == EXIT_ERROR and "UNAVAILABLE" in err and "agree on TLS" in err


async def test_exit_codes_for_an_expired_and_a_failed_batch(tmp_path):
    from tests.fakes.openai_compatible_upstream import FakeUpstream
    from tests.integration.batch_helpers import upstream_entry

    upstream = FakeUpstream()
    await upstream.start()
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-expiring", upstream.base_url, completion_window=1.5),
        {"model_name": "slow", "litellm_params": {"model": "simulated/slow", "latency_ms": 100, "max_concurrency": 1}}])
    lines = [request_line("stuck", model="fake-expiring", content="FAIL:hang"),
             request_line("fine", model="fake-expiring", content="fine")]
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    (tmp_path / "slow.jsonl").write_bytes(batch_file(100, model="slow"))
    try:
        async with serving(tmp_path / "data", config_file=config) as h:
            env = cli_env(h)
            code, summary = await cli_json(env, "run", str(tmp_path / "in.jsonl"), "--model", "fake-expiring")
            assert code == EXIT_EXPIRED and summary["batch"]["status"] == "expired"
            assert summary["failures_by_code"].get("batch_expired", 0) >= 1
            code, created = await cli_json(env, "batches", "create", (await cli_json(
                env, "files", "upload", str(tmp_path / "slow.jsonl")))[1]["id"], "--model", "slow")
    finally:
        await upstream.stop()
    # Started again without the deployment the batch is pinned to: it cannot go on, and fails.
    other = write_config(tmp_path / "other.yaml", [{"model_name": "x", "litellm_params": {"model": "simulated/x"}}])
    async with serving(tmp_path / "data", config_file=other) as h:
        code, out, err = await cli(cli_env(h), "batches", "watch", created["id"])
    assert code == EXIT_FAILED and "status      failed" in out and "deployment_not_found" in out


async def test_batches_create_maps_file_models_and_spreads(harness, tmp_path):
    env = cli_env(harness)
    (tmp_path / "in.jsonl").write_bytes(batch_file(4, model="house-model"))
    code, f = await cli_json(env, "files", "upload", str(tmp_path / "in.jsonl"))
    code, out, err = await cli(env, "batches", "create", f["id"])  # nothing serves house-model
    assert code == EXIT_ERROR and "MODEL_NOT_FOUND" in err and "lines 1, 2, 3, 4" in err
    code, b = await cli_json(env, "batches", "create", f["id"], "--model-map", "house-model=simulated", "--spread",
                             "--request-id", "mapped")
    assert code == EXIT_OK and (b["model"], b["endpoint"]) == ("simulated", "/v1/chat/completions")
    # the same request id with another map is another request
    code, out, err = await cli(env, "batches", "create", f["id"], "--model-map", "house-model=simulated",
                               "--request-id", "mapped")
    assert code == EXIT_ERROR and "REQUEST_ID_REUSED" in err and "spread" in err
    code, out, err = await cli(env, "batches", "create", f["id"], "--model-map", "house-model")
    assert code == EXIT_USAGE and "--model-map takes FILE_MODEL=MODEL" in err


async def test_run_maps_file_models_and_spreads_as_create_batch_does(tmp_path):
    config = write_config(tmp_path / "models.yaml", [
        {"model_name": "pool", "litellm_params": {"model": "simulated/echo"}, "model_info": {"id": f"pool-{n}"}}
        for n in (1, 2)])
    async with serving(tmp_path / "data", config_file=config) as h:
        env = cli_env(h)
        (tmp_path / "in.jsonl").write_bytes(batch_file(40, model="house-model"))
        # The server's checks, as for batches create: a key that is the model of no line is refused.
        code, _, err = await cli(env, "run", "in.jsonl", "--model-map", "other=pool", cwd=tmp_path)
        assert code == EXIT_ERROR and "INVALID_MODEL_MAP" in err, err
        code, summary = await cli_json(env, "run", str(tmp_path / "in.jsonl"), "--model-map", "house-model=pool",
                                       "--spread", "-o", str(tmp_path / "out.jsonl"))
        assert code == EXIT_OK == summary["exit_code"], summary
        batch = summary["batch"]
        assert (batch["model"], batch["request_counts"]["completed"]) == ("pool", 40)
        assert {s["deployment_id"]: s["request_counts"]["total"] for s in batch["shards"]} == {"pool-1": 20, "pool-2": 20}
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 40
        code, summary = await cli_json(env, "run", str(tmp_path / "in.jsonl"), "--model-map", "house-model=pool",
                                       "-o", str(tmp_path / "one.jsonl"))
        assert code == EXIT_OK and summary["batch"]["shards"] == [], "one job without --spread"
        code, _, err = await cli(env, "run", "in.jsonl", "--model-map", "house-model", cwd=tmp_path)
        assert code == EXIT_USAGE and "--model-map takes FILE_MODEL=MODEL" in err
        code, _, err = await cli(env, "run", "in.jsonl", cwd=tmp_path)
        assert code == EXIT_USAGE and "run takes --model" in err
