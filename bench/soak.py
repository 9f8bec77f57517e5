"""Does the server's memory level off under repeated load? ROUNDS rounds of CLIENTS concurrent
clients, each on its own connection, each doing what a real user does once: upload a small batch
file, GetFile, ListFiles, CreateBatch on the `simulated` model, GetBatch, WatchBatch to the end,
DownloadFile the results, DeleteFile input and output. Prints the server's RSS after each round
and after an idle pause, and the idle growth per round.

The server runs as its own process (batchgate-server, on uvloop); the clients run in CLIENT_PROCS
other processes, so client memory is not counted. About two minutes on the 2-core machine.
Target: the idle RSS levels off (no growth after the first rounds).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, ClientProcesses, reset_peak, rss_kib, run_loop, start_server, stop  # noqa: E402

import grpc  # noqa: E402

from batchgate import AsyncBatchgateClient  # noqa: E402
from batchgate._common import CHANNEL_OPTIONS  # noqa: E402
from batchgate.v1 import batch_pb2  # noqa: E402

ROUNDS = int(os.environ.get("SOAK_ROUNDS", "6"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "500"))
CLIENT_PROCS = 2
PROJECTS = 2
LINES = 5  # requests per batch file
IDLE_SECONDS = float(os.environ.get("SOAK_IDLE", "4"))
ROUND_TIMEOUT = 120.0  # a round that takes longer is reported as failed, not waited for
ENDPOINT = "/v1/chat/completions"
# Own connection per client: by default channels to one target share one TCP connection.
CLIENT_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def batch_file(client: int) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"c{client}-{i}", "method": "POST", "url": ENDPOINT,
        "body": {"model": "simulated", "max_tokens": 32, "messages": [
            {"role": "system", "content": "Classify the sentiment."},
            {"role": "user", "content": f"review {client}.{i}: the parcel arrived late but intact"}]},
    }).encode() + b"\n" for i in range(LINES))


async def count_lines(bg: AsyncBatchgateClient, file_id: str) -> int:
    return sum([data.count(b"\n") async for data in bg.iter_file(file_id)])


async def one_client(target: str, api_key: str, client: int) -> None:
    channel = grpc.aio.insecure_channel(target, options=CLIENT_CHANNEL_OPTIONS)
    async with AsyncBatchgateClient(target, api_key, channel=channel) as bg:
        f = await bg.upload_file(batch_file(client), filename=f"soak-{client}.jsonl")
        assert (await bg.get_file(f.id)).line_count == LINES
        listed = 0
        async for _ in bg.list_files(page_size=20):
            listed += 1
            if listed == 20:
                break
        batch = await bg.create_batch(f.id, ENDPOINT, model="simulated")
        await bg.get_batch(batch.id)
        final = await bg.wait(batch.id)
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        assert await count_lines(bg, final.output_file_id) == LINES
        await bg.delete_file(final.output_file_id)
        await bg.delete_file(f.id)
    await channel.close()


def client_process(target: str, api_keys: list[str], first: int, count: int, results) -> None:
    async def run() -> tuple[int, list[str]]:
        outcomes = await asyncio.gather(
            *[one_client(target, api_keys[i % len(api_keys)], i) for i in range(first, first + count)],
            return_exceptions=True)
        errors = [describe(o) for o in outcomes if isinstance(o, BaseException)]
        return count - len(errors), errors

    results.put(run_loop(run()))


def describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"[:160]
    return f"{type(error).__name__}: {error}"[:160]


def run_round(target: str, api_keys: list[str], round_no: int) -> tuple[int, list[str], float]:
    per_proc = CLIENTS // CLIENT_PROCS
    procs = ClientProcesses(client_process, [(target, api_keys, round_no * CLIENTS + p * per_proc, per_proc)
                                            for p in range(CLIENT_PROCS)])
    started = time.perf_counter()
    procs.start()
    ok, errors = 0, []
    for result in procs.collect(timeout=ROUND_TIMEOUT):
        if result is None:
            errors.append("a client process did not finish in time")
            continue
        done, failed = result
        ok += done
        errors += failed
    return ok, errors, time.perf_counter() - started


def create_keys(data_dir: Path) -> list[str]:
    keys = []
    for p in range(PROJECTS):
        out = subprocess.run([str(BIN / "batchgate-server"), "keys", "create", "--project", f"soak-{p}",
                              "--data-dir", str(data_dir)], capture_output=True, text=True, check=True).stdout
        keys.append(re.search(r"api_key:\s+(\S+)", out).group(1))
    return keys


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        api_keys = create_keys(data_dir)
        # Every client is a user of its own here, not one project's burst: the per-project cap on
        # concurrent uploads would refuse most of them.
        proc, port = start_server(data_dir, "--max-uploads-per-project", str(CLIENTS))
        target = f"127.0.0.1:{port}"
        try:
            time.sleep(1)
            idle = [rss_kib(proc.pid)]
            print(f"{ROUNDS} rounds of {CLIENTS} concurrent clients ({CLIENT_PROCS} client processes), "
                  f"{LINES}-request batches on `simulated`; idle pause {IDLE_SECONDS:.0f}s")
            print(f"server RSS at start: {mb(idle[0])}")
            print(f"{'round':>5} {'ok':>5} {'errors':>6} {'seconds':>7} {'peak RSS':>9} "
                  f"{'RSS after':>9} {'RSS idle':>9} {'idle growth':>11}")
            for round_no in range(ROUNDS):
                reset_peak(proc.pid)
                ok, errors, seconds = run_round(target, api_keys, round_no)
                peak, after = rss_kib(proc.pid, "VmHWM"), rss_kib(proc.pid)
                time.sleep(IDLE_SECONDS)
                idle.append(rss_kib(proc.pid))
                print(f"{round_no + 1:>5} {ok:>5} {len(errors):>6} {seconds:>7.1f} {mb(peak):>9} "
                      f"{mb(after):>9} {mb(idle[-1]):>9} {mb(idle[-1] - idle[-2], '+'):>11}", flush=True)
                for error in sorted(set(errors))[:3]:
                    print(f"      e.g. {error}")
            if ROUNDS >= 4:  # the plateau: the idle RSS of the later half of the rounds
                late = idle[ROUNDS // 2 + 1:]
                print(f"idle RSS over rounds {ROUNDS // 2 + 1}-{ROUNDS}: {mb(min(late))} to {mb(max(late))} "
                      f"(start {mb(idle[0])}, after round 1 {mb(idle[1])})")
        finally:
            stop(proc)


def mb(kib: float, sign: str = "") -> str:
    return f"{kib / 1024:{sign}.1f} MB"


if __name__ == "__main__":
    main()
