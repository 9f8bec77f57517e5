"""batchgate beside LiteLLM's proxy on the same fake OpenAI provider, interleaved on this machine: the
two targets of issue 11 that `make bench` leaves out (it measures batchgate against the machine's own
ceilings). Not run by `make bench`.

LiteLLM's proxy (litellm[proxy]==LITELLM_VERSION below, the release of the 1.106 line the issue
measured) is installed on first use into its own virtualenv, .bench/litellm-venv (gitignored), and
runs as `litellm --config ...` on a free loopback port; batchgate-server runs beside it with its
OpenAI-compatible HTTP API on. Both get the same deployment: model_name gpt-4o-mini ->
openai/gpt-4o-mini-2024-07-18 at tests/fakes/openai_batch_api.py, run in this process on its own
thread with ``store_uploads=False, synthetic_output=True`` as in bench/passthrough.py. LiteLLM runs
without a database and with a master key (it refuses to start without one), batchgate without a key
(as on loopback in the other benches). Every client call runs in a client process of its own (so the
fake's thread has this process's GIL to itself); each round measures both, in turn: uploads
batchgate then LiteLLM, passthrough LiteLLM then batchgate, and the other way round in the next.

1. Upload: bench/upload.py's 200 MiB, 202k-line chat file.
   * LiteLLM: the openai SDK's files.create (purpose batch, `?model=gpt-4o-mini` so the proxy uses
     the deployment's credentials). The proxy spools the body to disk, json-parses every line (an
     object with custom_id, method, url and body: no duplicate, method, url or model check), then
     forwards the file to the provider before it answers: its upload includes the provider hop.
   * batchgate: bench/upload.py's gRPC client (1 MiB chunks), and the same openai SDK client on
     /v1/files. Full validation (every rule: duplicate custom_ids, methods, urls, models, groups),
     stored on local disk; the provider hop comes at CreateBatch, so it is measured too: CreateBatch
     on the file until the provider has the last byte of the last job (202k lines are five OpenAI
     jobs of at most 50,000; the fake keeps them in progress meanwhile, so no results come back
     inside the hop), then the batch is cancelled.
   Target (issue 11): batchgate's upload >= 3x LiteLLM's. Printed also like for like (upload + hop).
2. Passthrough: bench/passthrough.py's 200 MB, 50,000-line file through to the provider and its
   ~200 MB output back: for batchgate its four phases (UploadFile; the upload to the provider and the
   results back, as the fake timed them; DownloadFile), for LiteLLM its files.create (which forwards)
   and files.content of the output (which it fetches from the provider); input + output MB over the
   phases' seconds, and end to end (batch polling at 0.2 s included on both sides).
   Target (issue 11): >= 1.5x LiteLLM for input + output.
3. Each server's peak RSS growth over the idle server (its child processes included) and its CPU
   per MiB, per measurement, and the provider's CPU.

    .venv/bin/python bench/versus_litellm.py [--rounds 2] [--upload-mib 200] [--pass-mb 200] [--pass-lines 50000]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, SPAWN, cpu_seconds, family, family_rss_kib, free_port, reset_family_peak,  # noqa: E402
                     start_server, stop, wait_http)
from passthrough import FakeOnThread, write_input  # noqa: E402
from upload import LIMITS, make_file, upload  # noqa: E402

sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from batchgate.errors import FailedPreconditionError  # noqa: E402
from batchgate.v1 import batch_pb2  # noqa: E402
from tests.fakes.openai_batch_api import FakeBatchAPI  # noqa: E402

LITELLM_VERSION = "1.106.12"
VENV = ROOT / ".bench" / "litellm-venv"
PROVIDER_KEY = "sk-bench-versus-litellm"
LITELLM_KEY = "sk-" + secrets.token_hex(32)
MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
POLL_S = 0.2
UPLOAD_TARGET = 3.0
PASSTHROUGH_TARGET = 1.5
MIB = 1024 * 1024
TERMINAL = ("completed", "failed", "expired", "cancelled")


def litellm_command() -> Path:
    """The `litellm` proxy command of .bench/litellm-venv, installed there first when missing."""
    command = VENV / "bin" / "litellm"
    check = [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    if command.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == LITELLM_VERSION:
        return command
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {VENV} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    return command


def deployment(api_base: str, **extra: object) -> dict:
    return {"model_list": [{
        "model_name": MODEL,
        "litellm_params": {"model": "openai/gpt-4o-mini-2024-07-18", "api_key": "os.environ/BENCH_OPENAI_KEY",
                           "api_base": api_base, "timeout": 600, **extra},
        "model_info": {"id": "bench-openai", "mode": "batch"}}]}


@contextlib.contextmanager
def litellm_proxy(config: Path, log: Path) -> Iterator[tuple[subprocess.Popen, tuple[str, str]]]:
    """LiteLLM's proxy on a free loopback port, without a database: its process, and (base URL,
    key). It refuses to start without a strong master key (batchgate serves loopback without one,
    as bench/upload.py runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(BENCH_OPENAI_KEY=PROVIDER_KEY, LITELLM_MASTER_KEY=LITELLM_KEY, LITELLM_LOCAL_MODEL_COST_MAP="True",
               LITELLM_LOG="ERROR")
    for _ in range(3):  # a free port may be taken by another process before the proxy binds it
        port = free_port()
        with open(log, "w") as out:
            proc = subprocess.Popen([str(litellm_command()), "--config", str(config), "--host", "127.0.0.1",
                                     "--port", str(port), "--num_workers", "1"], env=env, stdout=out, stderr=out)
        if _answers(proc, f"http://127.0.0.1:{port}/health/liveliness"):
            break
        stop(proc)
    else:
        raise RuntimeError(f"LiteLLM's proxy did not start: see {log}")
    try:
        yield proc, (f"http://127.0.0.1:{port}/v1", LITELLM_KEY)
    finally:
        stop(proc)


def _answers(proc: subprocess.Popen, url: str, seconds: float = 120) -> bool:
    """Whether `url` answers 200 before `proc` exits or `seconds` pass."""
    import httpx

    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------- client calls (each in the client process)
def _openai(api: tuple[str, str]):
    """An openai SDK client of `api`: (base URL, key)."""
    from openai import OpenAI

    return OpenAI(base_url=api[0], api_key=api[1], max_retries=0, timeout=900)


def sdk_upload(api: tuple[str, str], path: str, query: dict) -> tuple[float, str]:
    """Seconds of files.create(purpose=batch) of `path`, and the file's id."""
    client = _openai(api)
    with open(path, "rb") as fh:
        started = time.perf_counter()
        f = client.files.create(file=(Path(path).name, fh, "application/jsonl"), purpose="batch",
                                           extra_query=query)
        return time.perf_counter() - started, f.id


def sdk_run_batch(api: tuple[str, str], file_id: str) -> dict:
    """batches.create, then retrieve every POLL_S until the batch ends: the last Batch, as a dict."""
    client = _openai(api)
    batch = client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    while batch.status not in TERMINAL:
        time.sleep(POLL_S)
        batch = client.batches.retrieve(batch.id)
    return batch.model_dump()


def sdk_download(api: tuple[str, str], file_id: str, dest: str) -> tuple[float, int]:
    client = _openai(api)
    started, size = time.perf_counter(), 0
    with client.files.with_streaming_response.content(file_id) as response, open(dest, "wb") as out:
        for data in response.iter_bytes(MIB):
            out.write(data)
            size += len(data)
    return time.perf_counter() - started, size


def bg_upload(port: int, path: str) -> tuple[float, str, int]:
    """From an open file, as the openai SDK sends it (from a path the client reads the file once
    more first, for the sha256 it sends in the header)."""
    with BatchgateClient(f"127.0.0.1:{port}") as bg, open(path, "rb") as fh:
        started = time.perf_counter()
        f = bg.upload_file(fh, filename=Path(path).name)
        return time.perf_counter() - started, f.id, f.line_count


def bg_create(port: int, file_id: str) -> str:
    with BatchgateClient(f"127.0.0.1:{port}") as bg:
        return bg.create_batch(file_id, ENDPOINT).id


def bg_run_batch(port: int, file_id: str) -> tuple[str, int]:
    """CreateBatch until its end: its status's name, completed requests and output file id."""
    with BatchgateClient(f"127.0.0.1:{port}") as bg:
        final = bg.wait(bg.create_batch(file_id, ENDPOINT).id)
        return batch_pb2.BatchStatus.Name(final.status), final.request_counts.completed, final.output_file_id


def bg_download(port: int, file_id: str, dest: str) -> tuple[float, int]:
    with BatchgateClient(f"127.0.0.1:{port}") as bg:
        started = time.perf_counter()
        size = bg.download_file(file_id, dest)
        return time.perf_counter() - started, size


def warm_up() -> None:
    """Imports done before the first timed call."""
    _openai(("http://127.0.0.1:1/v1", "-"))


def grpc_upload(port: int, path: str) -> float:
    """bench/upload.py's raw streaming client (the file is deleted again)."""
    return upload(port, Path(path))[0]


# ---------------------------------------------------------------- measuring
IDLE_KIB: dict[int, int] = {}  # each server's RSS once started and warmed up (its whole family)


class Spent:
    """What a server (its whole process family) spent over what runs inside: its peak RSS growth
    over the idle server in MiB (as bench/passthrough.py counts it: a server that keeps its buffers
    after one phase would show none in the next over its RSS then), and CPU seconds (a measure the
    others' load moves less than a rate); and the CPU seconds of the fake provider's thread (the
    provider's side of the hops)."""

    def __init__(self, pid: int, provider_tid: int) -> None:
        self.pid, self.provider_tid = pid, provider_tid

    def _cpu(self) -> dict[int, float]:
        spent = {}
        for member in family(self.pid):
            with contextlib.suppress(OSError):
                spent[member] = cpu_seconds(member)
        return spent

    def __enter__(self) -> Spent:
        reset_family_peak(self.pid)
        self.cpu_before = self._cpu()
        self.provider_before = cpu_seconds(self.provider_tid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth_mib = (family_rss_kib(self.pid, "VmHWM") - IDLE_KIB[self.pid]) / 1024
        self.cpu_s = sum(now - self.cpu_before.get(member, 0.0) for member, now in self._cpu().items())
        self.provider_cpu_s = cpu_seconds(self.provider_tid) - self.provider_before


class Bench:
    def __init__(self, fake: FakeBatchAPI, fake_tid: int, pool, bg_proc, bg_port: int, bg_http: tuple[str, str],
                 ll_proc, ll_http: tuple[str, str], tmp: Path) -> None:
        self.fake, self.fake_tid, self.pool, self.tmp = fake, fake_tid, pool, tmp
        self.bg_proc, self.bg_port, self.bg_http = bg_proc, bg_port, bg_http
        self.ll_proc, self.ll_http = ll_proc, ll_http
        self.results: dict[str, list[float]] = {}

    def record(self, name: str, value: float) -> None:
        self.results.setdefault(name, []).append(value)

    def account(self, name: str, spent: Spent, amount: float) -> None:
        """`name rss` (MiB) and `name cpu` (ms per unit of `amount`)."""
        self.record(f"{name} rss", spent.growth_mib)
        self.record(f"{name} cpu", spent.cpu_s * 1000 / amount)
        self.record(f"{name} provider cpu", spent.provider_cpu_s * 1000 / amount)

    def new_uploads(self, before: set[str]) -> list:
        return [stats for file_id, stats in list(self.fake.uploads.items()) if file_id not in before]

    # -- 1. upload
    def warm_up(self, path: Path) -> None:
        """One small upload to each, unmeasured: batchgate starts its validation workers (a fixed
        cost, bench/upload.py prints it), both servers finish their lazy start-up."""
        self.pool.apply(grpc_upload, (self.bg_port, str(path)))
        self.pool.apply(sdk_upload, (self.ll_http, str(path), {"model": MODEL}))
        self.fake.uploads.clear()

    def upload_litellm(self, path: Path, mib: float) -> None:
        before = set(self.fake.uploads)
        with Spent(self.ll_proc.pid, self.fake_tid) as spent:
            seconds, _ = self.pool.apply(sdk_upload, (self.ll_http, str(path), {"model": MODEL}))
        (stats,) = self.new_uploads(before)
        assert stats.bytes == path.stat().st_size, stats.bytes
        stats.records = None  # no batch is made of it
        self.record("upload litellm", mib / seconds)
        self.record("upload litellm hop", stats.bytes / MIB / (stats.finished_at - stats.started_at))
        self.account("upload litellm", spent, mib)

    def upload_batchgate(self, path: Path, mib: float, lines: int) -> None:
        with Spent(self.bg_proc.pid, self.fake_tid) as spent:
            seconds = self.pool.apply(grpc_upload, (self.bg_port, str(path)))
        self.record("upload batchgate grpc", mib / seconds)
        self.account("upload batchgate grpc", spent, mib)
        with Spent(self.bg_proc.pid, self.fake_tid) as spent:
            seconds, file_id = self.pool.apply(sdk_upload, (self.bg_http, str(path), {}))
        self.record("upload batchgate http", mib / seconds)
        self.account("upload batchgate http", spent, mib)
        # The provider hop, which batchgate makes at CreateBatch: until the provider has every job's
        # file (all the lines) and a batch made of each.
        before = set(self.fake.uploads)
        self.fake.lines_per_tick = 1  # the jobs stay in progress: no results come back during the hop
        with BatchgateClient(f"127.0.0.1:{self.bg_port}") as bg, Spent(self.bg_proc.pid, self.fake_tid) as spent:
            started = time.monotonic()
            batch_id = self.pool.apply(bg_create, (self.bg_port, file_id))
            deadline = started + 300
            while True:
                hop = {fid: stats for fid, stats in list(self.fake.uploads.items()) if fid not in before}
                submitted = {b.input_file_id for b in list(self.fake.batches.values())}
                if sum(s.lines for s in hop.values()) == lines and submitted >= hop.keys():
                    break
                assert time.monotonic() < deadline, bg.get_batch(batch_id)
                time.sleep(0.02)
            hop_s = max(s.finished_at for s in hop.values()) - started
        with BatchgateClient(f"127.0.0.1:{self.bg_port}") as bg:
            bg.cancel_batch(batch_id)
            bg.wait(batch_id)
            # A cancelled batch shows CANCELLED while its shards still end at the provider, and
            # its input stays in use until they have: delete it once it may be (the shards' work
            # done, so it does not run into the next measurement).
            deadline = time.monotonic() + 120
            while True:
                try:
                    bg.delete_file(file_id)
                    break
                except FailedPreconditionError:
                    assert time.monotonic() < deadline, bg.get_batch(batch_id)
                    time.sleep(0.1)
        self.fake.lines_per_tick = None
        for stats in hop.values():
            stats.records = None
        self.record("upload batchgate hop", mib / hop_s)
        self.record("upload batchgate http+hop", mib / (seconds + hop_s))
        self.account("upload batchgate hop", spent, mib)

    # -- 2. passthrough
    def passthrough_batchgate(self, source: Path, lines: int) -> None:
        self.fake.downloads.clear()  # what the upload section's batches fetched
        before = set(self.fake.uploads)
        dest = self.tmp / "bg-output.jsonl"
        with Spent(self.bg_proc.pid, self.fake_tid) as spent:
            started = time.perf_counter()
            upload_s, file_id, line_count = self.pool.apply(bg_upload, (self.bg_port, str(source)))
            assert line_count == lines, line_count
            status, completed, output_id = self.pool.apply(bg_run_batch, (self.bg_port, file_id))
            assert status == "BATCH_STATUS_COMPLETED" and completed == lines, (status, completed)
            download_s, out_bytes = self.pool.apply(bg_download, (self.bg_port, output_id, str(dest)))
            end_to_end = time.perf_counter() - started
        (stats,) = self.new_uploads(before)
        up_s = stats.finished_at - stats.started_at
        dl_start, dl_end, _ = self.provider_download(out_bytes)  # type: ignore[misc]
        phases = upload_s + up_s + (dl_end - dl_start) + download_s
        total_mb = (source.stat().st_size + out_bytes) / 1e6
        self.record("pass batchgate", total_mb / phases)
        self.record("pass batchgate e2e", total_mb / end_to_end)
        self.account("pass batchgate", spent, total_mb)
        with BatchgateClient(f"127.0.0.1:{self.bg_port}") as bg:
            bg.delete_file(file_id)
            bg.delete_file(output_id)

    def passthrough_litellm(self, source: Path, lines: int) -> None:
        self.fake.downloads.clear()
        dest = self.tmp / "ll-output.jsonl"
        with Spent(self.ll_proc.pid, self.fake_tid) as spent:
            started = time.perf_counter()
            upload_s, file_id = self.pool.apply(sdk_upload, (self.ll_http, str(source), {"model": MODEL}))
            batch = self.pool.apply(sdk_run_batch, (self.ll_http, file_id))
            assert batch["status"] == "completed" and batch["request_counts"]["completed"] == lines, batch
            # The retrieve that saw it completed makes the proxy fetch the output from the provider
            # for its cost tracking, in the background: wait for that, so that it does not share the
            # provider with the download measured next (and count it apart).
            cost_fetch = self.provider_download(None, wait=60)
            download_s, out_bytes = self.pool.apply(sdk_download, (self.ll_http, batch["output_file_id"], str(dest)))
            end_to_end = time.perf_counter() - started
        if cost_fetch is not None:  # (first byte, last byte, bytes)
            self.record("pass litellm cost fetch", cost_fetch[2] / 1e6 / (cost_fetch[1] - cost_fetch[0]))
        self.provider_download(out_bytes)  # it went through the provider
        total_mb = (source.stat().st_size + out_bytes) / 1e6
        self.record("pass litellm", total_mb / (upload_s + download_s))
        self.record("pass litellm e2e", total_mb / end_to_end)
        self.account("pass litellm", spent, total_mb)

    def provider_download(self, size: int | None, wait: float = 0) -> tuple[float, float, int] | None:
        """(first byte, last byte, bytes) of the provider's one download since the last call (of
        `size` bytes, when given), forgotten then; None if none came within `wait` seconds."""
        deadline = time.monotonic() + wait
        while not (found := [k for k, (_, _, sent) in list(self.fake.downloads.items()) if size in (None, sent)]):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        (file_id,) = found
        return self.fake.downloads.pop(file_id)


def span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x (target >= {target}x: {'meets' if ratio >= target else 'MISSES'})"


def ratios(numerators: list[float], denominators: list[float]) -> str:
    """Per-round ratios (the rounds are interleaved: a ratio of one round shares its load)."""
    values = [n / d for n, d in zip(numerators, denominators)]
    return f"{min(values):.2f}-{max(values):.2f}x"


def report(r: dict[str, list[float]], rounds: int, upload_what: str, pass_what: str) -> None:
    def row(label: str, key: str) -> None:
        columns = [span(r.get(key + suffix, [])) for suffix in (" rss", " cpu")]
        print(f"  {label:<62} {span(r[key]):>12} {columns[0]:>12} {columns[1]:>12}"
              f" {span(r.get(key + ' provider cpu', [])):>14}")

    print(f"\n== 1. upload of {upload_what}; {rounds} interleaved rounds, ranges ==")
    print(f"  {'':<62} {'MiB/s':>12} {'RSS +MiB':>12} {'CPU ms/MiB':>12} {'provider CPU':>14}")
    row("LiteLLM /v1/files, openai SDK (answers once forwarded)", "upload litellm")
    row("  its forward to the provider (first to last byte there)", "upload litellm hop")
    row("batchgate UploadFile, gRPC (bench/upload.py's client)", "upload batchgate grpc")
    row("batchgate /v1/files, openai SDK", "upload batchgate http")
    row("batchgate's provider hop (CreateBatch to the last byte there)", "upload batchgate hop")
    row("batchgate /v1/files + its provider hop", "upload batchgate http+hop")
    ll = r["upload litellm"]
    for name, key in (("gRPC", "upload batchgate grpc"), ("/v1/files", "upload batchgate http")):
        print(f"  batchgate {name} / LiteLLM: {ratios(r[key], ll)} per round; best/best"
              f" {verdict(max(r[key]) / max(ll), UPLOAD_TARGET)}")
    both = [h + c for h, c in zip(r["upload batchgate http cpu"], r["upload batchgate hop cpu"])]
    print(f"  like for like, both through to the provider: /v1/files + hop / LiteLLM"
          f" {ratios(r['upload batchgate http+hop'], ll)} per round; server CPU per MiB LiteLLM / batchgate"
          f" {ratios(r['upload litellm cpu'], both)}")

    print(f"\n== 2. passthrough of {pass_what} and its output back; input + output; {rounds} rounds ==")
    print(f"  {'':<62} {'MB/s':>12} {'RSS +MiB':>12} {'CPU ms/MB':>12} {'provider CPU':>14}")
    row("batchgate, its four phases (as bench/passthrough.py)", "pass batchgate")
    row("batchgate, end to end (0.2 s polls)", "pass batchgate e2e")
    row("LiteLLM, files.create + files.content", "pass litellm")
    row("LiteLLM, end to end (0.2 s polls)", "pass litellm e2e")
    if r.get("pass litellm cost fetch"):
        row("  + its own fetch of the output for cost (not counted)", "pass litellm cost fetch")
    print(f"  batchgate / LiteLLM: {ratios(r['pass batchgate'], r['pass litellm'])} per round; best/best"
          f" {verdict(max(r['pass batchgate']) / max(r['pass litellm']), PASSTHROUGH_TARGET)}; end to end"
          f" {ratios(r['pass batchgate e2e'], r['pass litellm e2e'])}; server CPU per MB (whole job) LiteLLM /"
          f" batchgate {ratios(r['pass litellm cpu'], r['pass batchgate cpu'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--upload-mib", type=float, default=200.0, help="upload file size in MiB (bench/upload.py's)")
    ap.add_argument("--pass-mb", type=float, default=200.0, help="passthrough input in MB (bench/passthrough.py's)")
    ap.add_argument("--pass-lines", type=int, default=50_000)
    args = ap.parse_args()
    litellm_command()
    # The fake logs a traceback for each download its client ends early (batchgate's, of a job
    # cancelled mid-stream): expected here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    print(f"load average {os.getloadavg()[0]:.1f} at start; LiteLLM proxy {LITELLM_VERSION}", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name, \
            (provider := FakeOnThread(FakeBatchAPI(api_key=PROVIDER_KEY, store_uploads=False,
                                                   synthetic_output=True))) as fake, \
            SPAWN.Pool(1) as pool:
        tmp = Path(tmp_name)
        big, source = tmp / "upload.jsonl", tmp / "passthrough.jsonl"
        big_lines = make_file(big, int(args.upload_mib * MIB), 1030)
        write_input(source, int(args.pass_mb * 1e6), args.pass_lines)
        big_mib = big.stat().st_size / MIB
        pool.apply(warm_up)
        print(f"upload file {big_mib:.0f} MiB, {big_lines:,} lines; passthrough file"
              f" {source.stat().st_size / 1e6:.0f} MB, {args.pass_lines:,} lines", flush=True)

        ll_config, bg_config = tmp / "litellm.yaml", tmp / "batchgate.yaml"
        ll_config.write_text(yaml.safe_dump(deployment(fake.base_url)))
        bg_config.write_text(yaml.safe_dump(deployment(fake.base_url, poll_interval=POLL_S)))
        http_port = free_port()
        bg_proc, bg_port = start_server(tmp / "data", "--config", str(bg_config), "--http-address",
                                        f"127.0.0.1:{http_port}", *LIMITS,
                                        env={"BENCH_OPENAI_KEY": PROVIDER_KEY, "BATCHGATE_MASTER_KEY": ""})
        try:
            wait_http(f"http://127.0.0.1:{http_port}/v1/files")
            with litellm_proxy(ll_config, VENV.parent / "litellm-proxy.log") as (ll_proc, ll_http):
                bg_http = (f"http://127.0.0.1:{http_port}/v1", "unused")  # no key: batchgate serves loopback without
                bench = Bench(fake, provider.thread.native_id, pool, bg_proc, bg_port, bg_http, ll_proc, ll_http, tmp)
                warm = tmp / "warm.jsonl"
                make_file(warm, 2 * MIB + 64 * 1024, 1030)
                bench.warm_up(warm)
                IDLE_KIB.update({pid: family_rss_kib(pid) for pid in (bg_proc.pid, ll_proc.pid)})
                print(f"idle RSS after one small upload each (growth is counted from it): batchgate"
                      f" {IDLE_KIB[bg_proc.pid] / 1024:.0f} MiB, LiteLLM {IDLE_KIB[ll_proc.pid] / 1024:.0f} MiB",
                      flush=True)
                for r in range(args.rounds):
                    steps = [lambda: bench.upload_batchgate(big, big_mib, big_lines),
                             lambda: bench.upload_litellm(big, big_mib),
                             lambda: bench.passthrough_litellm(source, args.pass_lines),
                             lambda: bench.passthrough_batchgate(source, args.pass_lines)]
                    if r % 2:  # LiteLLM first in every other round
                        steps = [steps[1], steps[0], steps[3], steps[2]]
                    started = time.perf_counter()
                    for step in steps:
                        step()
                    print(f"round {r + 1}: {time.perf_counter() - started:.0f} s, load average"
                          f" {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            stop(bg_proc)
        report(bench.results, args.rounds, f"{big_mib:.0f} MiB, {big_lines:,} lines",
               f"{source.stat().st_size / 1e6:.0f} MB, {args.pass_lines:,} lines")
        print(f"load average at the end {os.getloadavg()[0]:.1f} (2 cores)")


if __name__ == "__main__":
    main()
