"""Object-storage clients compared, and the blob stores beside local disk.

Each candidate runs in a fresh child process (so its RSS is its own) and streams the same blob
(default 200 MB, fed in 1 MiB writes as an upload would) in 8 MiB parts, at most two in flight
for S3 (a resumable GCS session takes its chunks one after the other), then reads it back in
ranged reads of 4 MiB. The emulators run in their own processes (moto_server,
gcp-storage-emulator --in-memory): Python servers, so they are the ceiling of every candidate;
what differs is what the client costs on top. Local disk (write + fsync, then pread) is the
machine's own ceiling.

    python bench/blob_clients.py [--mb 200] [--only s3-httpx,gcs-httpx,...]

S3: s3-httpx (ours: httpx + botocore's SigV4 signer), s3-boto3 (boto3 in worker threads).
GCS: gcs-httpx (ours: httpx on the JSON API), gcs-client (google-cloud-storage's BlobWriter and
ranged download_as_bytes in worker threads). Local: the same blob written to a temp file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MOTO_CREDENTIALS, ROOT, emulator, moto_server, new_s3_bucket, rss_kib,
)

MB = 1024 * 1024
PART = 8 * MB
WRITE = 1 * MB
RANGE = 4 * MB
CANDIDATES = ["local-disk", "s3-httpx", "s3-boto3", "gcs-httpx", "gcs-client"]


def payload(size: int) -> bytes:
    return os.urandom(WRITE) * (size // WRITE)


def peak_growth(baseline_kib: int) -> float:
    return (rss_kib(os.getpid(), "VmHWM") - baseline_kib) / 1024


# -- candidates (each in its own process) ---------------------------------------------------------

async def run_ours(kind: str, endpoint: str, bucket: str, size: int) -> dict:
    from batchgate_server.store.blobs.gcs import GcsBlobStore
    from batchgate_server.store.blobs.s3 import S3BlobStore

    store = S3BlobStore(bucket, "bench", endpoint_url=endpoint) if kind == "s3" else \
        GcsBlobStore(bucket, "bench", endpoint_url=endpoint)
    chunk = os.urandom(WRITE)
    baseline = rss_kib(os.getpid())
    start = time.perf_counter()
    writer = store.open_writer()
    for _ in range(size // WRITE):
        await writer.write(chunk)
    await writer.commit("file-bench")
    upload = time.perf_counter() - start
    growth = peak_growth(baseline)
    start = time.perf_counter()
    got = 0
    for offset in range(0, size, RANGE):
        async for piece in store.read("file-bench", offset, RANGE, chunk_size=RANGE):
            got += len(piece)
    ranged = time.perf_counter() - start
    await store.close()
    assert got == size, got
    return {"upload_s": upload, "ranged_s": ranged, "rss_growth_mb": growth}


async def run_s3_boto3(endpoint: str, bucket: str, size: int) -> dict:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=4, retries={"mode": "standard"}))
    chunk = os.urandom(WRITE)
    baseline = rss_kib(os.getpid())
    start = time.perf_counter()
    key = "bench/.staging/boto3"
    upload_id = (await asyncio.to_thread(s3.create_multipart_upload, Bucket=bucket, Key=key))["UploadId"]
    parts, pending, buf, number = [], set(), bytearray(), 0

    async def send(n: int, data: bytes) -> None:
        resp = await asyncio.to_thread(s3.upload_part, Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n,
                                       Body=data)
        parts.append({"PartNumber": n, "ETag": resp["ETag"]})

    async def submit(data: bytes) -> None:
        nonlocal number, pending
        while len(pending) >= 2:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        number += 1
        pending.add(asyncio.create_task(send(number, data)))

    for _ in range(size // WRITE):
        buf += chunk
        if len(buf) >= PART:
            await submit(bytes(buf[:PART]))
            del buf[:PART]
    if buf:
        await submit(bytes(buf))
    await asyncio.gather(*pending)
    await asyncio.to_thread(s3.complete_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id,
                            MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])})
    await asyncio.to_thread(s3.copy_object, Bucket=bucket, Key="bench/file-bench",
                            CopySource={"Bucket": bucket, "Key": key})
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=key)
    upload = time.perf_counter() - start
    growth = peak_growth(baseline)
    start = time.perf_counter()
    got = 0
    for offset in range(0, size, RANGE):
        body = (await asyncio.to_thread(s3.get_object, Bucket=bucket, Key="bench/file-bench",
                                        Range=f"bytes={offset}-{offset + RANGE - 1}"))["Body"]
        while data := await asyncio.to_thread(body.read, 256 * 1024):
            got += len(data)
    ranged = time.perf_counter() - start
    assert got == size, got
    return {"upload_s": upload, "ranged_s": ranged, "rss_growth_mb": growth}


async def run_gcs_client(endpoint: str, bucket: str, size: int) -> dict:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    chunk = os.urandom(WRITE)
    baseline = rss_kib(os.getpid())
    start = time.perf_counter()
    staging = client.bucket(bucket).blob("bench/.staging/client")
    fh = await asyncio.to_thread(staging.open, "wb", chunk_size=PART)
    for _ in range(size // WRITE):
        await asyncio.to_thread(fh.write, chunk)
    await asyncio.to_thread(fh.close)
    final = client.bucket(bucket).blob("bench/file-bench")
    await asyncio.to_thread(final.rewrite, staging)
    await asyncio.to_thread(staging.delete)
    upload = time.perf_counter() - start
    growth = peak_growth(baseline)
    start = time.perf_counter()
    got = 0
    for offset in range(0, size, RANGE):
        data = await asyncio.to_thread(final.download_as_bytes, start=offset, end=offset + RANGE - 1)
        got += len(data)
    ranged = time.perf_counter() - start
    assert got == size, got
    return {"upload_s": upload, "ranged_s": ranged, "rss_growth_mb": growth}


async def run_local(size: int) -> dict:
    chunk = os.urandom(WRITE)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = Path(tmp) / "blob"
        baseline = rss_kib(os.getpid())
        start = time.perf_counter()
        with open(path, "wb") as fh:
            for _ in range(size // WRITE):
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(os.fsync, fh.fileno())
        upload = time.perf_counter() - start
        growth = peak_growth(baseline)
        start = time.perf_counter()
        got = 0
        with open(path, "rb") as fh:
            for offset in range(0, size, RANGE):
                got += len(await asyncio.to_thread(os.pread, fh.fileno(), RANGE, offset))
        ranged = time.perf_counter() - start
    assert got == size
    return {"upload_s": upload, "ranged_s": ranged, "rss_growth_mb": growth}


def child(name: str, endpoint: str, bucket: str, size: int) -> None:
    os.environ.update(MOTO_CREDENTIALS)
    runs = {"local-disk": lambda: run_local(size), "s3-httpx": lambda: run_ours("s3", endpoint, bucket, size),
            "s3-boto3": lambda: run_s3_boto3(endpoint, bucket, size),
            "gcs-httpx": lambda: run_ours("gcs", endpoint, bucket, size),
            "gcs-client": lambda: run_gcs_client(endpoint, bucket, size)}
    print(json.dumps(asyncio.run(runs[name]())))


# -- the parent: emulators, then each candidate -----------------------------------------------------

def new_gcs_bucket(endpoint: str) -> str:
    import httpx

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    httpx.post(f"{endpoint}/storage/v1/b?project=bench", json={"name": bucket}).raise_for_status()
    return bucket


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--only", default=",".join(CANDIDATES))
    parser.add_argument("--child", nargs=3, metavar=("NAME", "ENDPOINT", "BUCKET"))
    args = parser.parse_args()
    size = args.mb * MB
    if args.child:
        child(*args.child, size)
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'clients/python'}"}
    with moto_server() as s3_url, emulator("gcp-storage-emulator", "start", "-q", "-M") as gcs_url:
        print(f"{args.mb} MB in {WRITE // MB} MiB writes, {PART // MB} MiB parts; "
              f"read back in {RANGE // MB} MiB ranges")
        print(f"{'candidate':>11} {'upload MB/s':>12} {'ranged MB/s':>12} {'RSS growth MB':>14} {'vs disk':>8}")
        disk = None
        for name in args.only.split(","):
            endpoint, bucket = "", ""
            if name.startswith("s3"):
                endpoint, bucket = s3_url, new_s3_bucket(s3_url)
            elif name.startswith("gcs"):
                endpoint, bucket = gcs_url, new_gcs_bucket(gcs_url)
            out = subprocess.run([sys.executable, __file__, "--mb", str(args.mb), "--child", name, endpoint or "-",
                                  bucket or "-"], env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"{name:>11} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout)
            up = args.mb / r["upload_s"]
            disk = up if name == "local-disk" else disk
            ratio = f"{up / disk:7.2f}x" if disk else ""
            print(f"{name:>11} {up:12.1f} {args.mb / r['ranged_s']:12.1f} {r['rss_growth_mb']:14.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
