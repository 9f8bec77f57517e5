"""Blobs in Google Cloud Storage: `gs://bucket/prefix`.

The client: httpx (async) on the GCS JSON API, with google-auth for credentials (Application
Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, the metadata server; token
refreshes run in a worker thread). `STORAGE_EMULATOR_HOST` points it at an emulator (no
credentials then). Chosen by measurement, bench/blob_clients.py (as for S3: 200 MB, 8 MiB
chunks, gcp-storage-emulator in its own process, two rounds on the shared 2-core machine):

    candidate                                      upload MB/s   ranged MB/s   client RSS growth
    httpx, JSON API (this)                         55.0, 27.1    194, 115      18, 18 MB
    google-cloud-storage BlobWriter in threads     44.4, 29.3    281, 373      40, 48 MB

Uploads are the same within the noise, at less than half the memory and with no thread per call;
ranged reads from the in-memory emulator are slower (httpx reads the socket 64 KiB at a time
on the event loop), still well above any upload rate and far above what a real bucket over a
network gives. gcloud-aio-storage was not measured: its upload takes the payload (bytes or a file
object) in one call, with no way to add chunks as they arrive and finish the session at commit.

Writing: a resumable upload session on a staging object `<prefix>/.staging/<uuid>` (the key is only
known at commit), fed 8 MiB chunks in the background (one in flight: a session takes its chunks in
order), finalised only at commit by the last chunk, which states the total size. Then the staging
object is rewritten onto `<prefix>/<key>` server-side (atomic for readers; in one bucket a rewrite
is a metadata operation) and deleted. A blob that fits in one chunk is a single upload at commit,
with no staging. Abort cancels the session (DELETE on its URI). An unfinished session is never
visible and GCS forgets it after a week; a finalised staging object a crash left is removed by
`sweep_stale_uploads` (objects under `.staging/` older than `stale_after`), run in the background at
most once an hour when writers are opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx

from batchgate_server.store.blobs.remote import (
    PART_SIZE, STAGING, CallLimits, HttpBackend, PartUploads, check_key, join, read_resuming, staged_at,
    staging_name, unexpected,
)
from batchgate_server.store.errors import StorageError, StorageUnavailable
from batchgate_server.store.ports import DEFAULT_READ_CHUNK, BlobStore, BlobWriter
from batchgate_server.store.urls import StoreUrl

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
SWEEP_INTERVAL = 3600.0
SWEEP_MAX_PAGES = 10
_REWRITE_ROUNDS = 100  # rewrites across locations or classes take several calls; ours take one


def _q(name: str) -> str:
    return quote(name, safe="")


class GcsBlobWriter(BlobWriter):
    def __init__(self, store: GcsBlobStore) -> None:
        self._store = store
        self._staging = join(store.prefix, staging_name())
        self._session = ""
        self._sent = 0  # bytes the session has acknowledged
        self._finalised = False
        self._done = False
        self._parts = PartUploads(self._begin, self._send_chunk, store.part_size, in_flight=1)

    async def write(self, data: bytes) -> None:
        if self._done:
            raise StorageError("write after commit or abort")
        try:
            await self._parts.write(data)
        except BaseException:
            await self.abort()
            raise

    async def _begin(self, name: str = "") -> None:
        resp = await self._store.http.call(
            "POST", self._store.upload_url(name or self._staging, "resumable"), body=b"{}",
            headers={"Content-Type": "application/json", "X-Upload-Content-Type": "application/octet-stream"},
            what="start resumable upload")
        if resp.status_code != 200 or "location" not in resp.headers:
            raise unexpected("gcs", "start resumable upload", resp)
        self._session = resp.headers["location"]

    async def _send_chunk(self, number: int, data: bytes, total: int | None = None) -> None:
        """Send `data` from byte `_sent` on; `total` (the blob's size) finalises the upload. A chunk
        the session kept only in part (its Range says so) is sent again from there."""
        start = self._sent
        while True:
            offset = self._sent - start
            piece = data[offset:]
            last = f"{self._sent + len(piece) - 1}" if piece else ""
            content_range = f"bytes {self._sent}-{last}/{total if total is not None else '*'}" if piece \
                else f"bytes */{total}"
            resp = await self._store.http.call("PUT", self._session, body=piece,
                                               headers={"Content-Range": content_range}, what="upload chunk")
            if resp.status_code in (200, 201):
                self._sent += len(piece)
                self._finalised = True
                return
            if resp.status_code != 308:
                raise unexpected("gcs", "upload chunk", resp)
            persisted = resp.headers.get("range", "")  # "bytes=0-N": N+1 bytes kept so far
            kept = int(persisted.rsplit("-", 1)[-1]) + 1 if persisted else 0
            if kept <= self._sent and piece:
                raise StorageUnavailable("gcs upload chunk: the session kept none of the chunk")
            self._sent = kept
            if total is None and self._sent >= start + len(data):
                return

    async def commit(self, key: str) -> int:
        final = join(self._store.prefix, check_key(key))
        if self._done:
            raise StorageError("commit after commit or abort")
        try:
            size = self._parts.size
            if size == 0:
                # One resumable request stating a total of 0: gcp-storage-emulator fails an empty
                # simple upload.
                await self._begin(final)
                await self._send_chunk(1, b"", total=0)
            elif self._parts.parts == 0:
                resp = await self._store.http.call("POST", self._store.upload_url(final, "media"),
                                                   body=self._parts.tail(),
                                                   headers={"Content-Type": "application/octet-stream"},
                                                   what="upload")
                if resp.status_code != 200:
                    raise unexpected("gcs", "upload", resp)
            else:
                tail = self._parts.tail()
                await self._parts.finish(b"")
                await self._send_chunk(self._parts.parts + 1, tail, total=size)
                await self._store.rewrite(self._staging, final)
                await self._store.delete_object(self._staging)
        except BaseException:
            await self.abort()
            raise
        self._done = True
        return size

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        await self._parts.cancel()
        try:
            if self._finalised:
                await self._store.delete_object(self._staging)
            elif self._session:
                # GCS answers a cancelled session with 499; emulators may not know the verb.
                await self._store.http.call("DELETE", self._session, what="cancel resumable upload")
        except StorageError as err:
            log.warning("gcs: could not discard the staging upload %s: %s", self._staging, err)


class GcsBlobStore(BlobStore):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 limits: CallLimits = CallLimits(), part_size: int = PART_SIZE,
                 stale_after: float = 24 * 3600.0) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.limits = limits
        self.stale_after = stale_after
        emulator = endpoint_url or os.environ.get(EMULATOR_ENV, "")
        if emulator and "://" not in emulator:
            emulator = f"http://{emulator}"
        self._anonymous = bool(emulator)
        self._base = emulator.rstrip("/") if emulator else "https://storage.googleapis.com"
        self._credentials: Any = None
        self.http = HttpBackend("gcs", self._authorise, limits)
        self._sweep: asyncio.Task[int] | None = None
        self._next_sweep = 0.0

    # -- the HTTP layer -------------------------------------------------------------------

    async def _authorise(self, method: str, url: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        if self._anonymous:
            return headers
        if self._credentials is None or not self._credentials.valid:
            self._credentials = await asyncio.to_thread(self._fresh_credentials)
        headers["Authorization"] = f"Bearer {self._credentials.token}"
        return headers

    def _fresh_credentials(self) -> Any:
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import Request

        try:
            creds = self._credentials or google.auth.default(scopes=[SCOPE])[0]
            creds.refresh(Request())
        except google.auth.exceptions.DefaultCredentialsError as err:
            raise StorageError(f"gcs: no Google credentials: {err}") from None
        except google.auth.exceptions.GoogleAuthError as err:
            raise StorageUnavailable(f"gcs: refreshing the access token failed: {type(err).__name__}") from None
        return creds

    def object_url(self, name: str, **params: str) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"{self._base}/storage/v1/b/{_q(self.bucket)}/o/{_q(name)}{query}"

    def upload_url(self, name: str, kind: str) -> str:
        return (f"{self._base}/upload/storage/v1/b/{_q(self.bucket)}/o?"
                f"{urlencode({'uploadType': kind, 'name': name})}")

    async def metadata(self, name: str) -> dict[str, Any] | None:
        resp = await self.http.call("GET", self.object_url(name), what="get object")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise unexpected("gcs", "get object", resp)
        return resp.json()

    async def delete_object(self, name: str) -> bool:
        resp = await self.http.call("DELETE", self.object_url(name), what="delete object")
        if resp.status_code not in (200, 204, 404):
            raise unexpected("gcs", "delete object", resp)
        return resp.status_code != 404

    async def rewrite(self, source: str, target: str) -> None:
        """Copy `source` onto `target` server-side; atomic for the reader of `target`."""
        url = f"{self._base}/storage/v1/b/{_q(self.bucket)}/o/{_q(source)}/rewriteTo/b/{_q(self.bucket)}/o/{_q(target)}"
        token = ""
        for _ in range(_REWRITE_ROUNDS):
            resp = await self.http.call("POST", f"{url}?{urlencode({'rewriteToken': token})}" if token else url,
                                        body=b"{}", headers={"Content-Type": "application/json"}, what="rewrite")
            if resp.status_code != 200:
                raise unexpected("gcs", "rewrite", resp)
            answer = resp.json()
            if answer.get("done"):
                return
            token = answer.get("rewriteToken", "")
        raise StorageUnavailable("gcs rewrite: not done after many rounds")

    async def _list(self, prefix: str, delimiter: bool) -> AsyncIterator[dict[str, Any]]:
        params = {"prefix": prefix, "fields": "items(name,timeCreated),nextPageToken"}
        if delimiter:
            params["delimiter"] = "/"
        for _ in range(10 ** 6):
            resp = await self.http.call(
                "GET", f"{self._base}/storage/v1/b/{_q(self.bucket)}/o?{urlencode(params)}", what="list objects")
            if resp.status_code != 200:
                raise unexpected("gcs", "list objects", resp)
            page = resp.json()
            for item in page.get("items", ()):
                yield item
            if not page.get("nextPageToken"):
                return
            params["pageToken"] = page["nextPageToken"]

    # -- the port ---------------------------------------------------------------------------

    def open_writer(self) -> GcsBlobWriter:
        self._maybe_sweep()
        return GcsBlobWriter(self)

    async def read(self, key: str, offset: int = 0, limit: int = 0,
                   chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncIterator[bytes]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        name = join(self.prefix, check_key(key))
        end = offset + limit if limit else None
        generation = ""

        @contextlib.asynccontextmanager
        async def open_range(pos: int) -> AsyncIterator[httpx.Response | None]:
            nonlocal generation
            # The generation pins the object read first: a resumed read never mixes two versions.
            params = {"alt": "media", **({"generation": generation} if generation else {})}
            headers = {}
            if pos or end is not None:
                headers["Range"] = f"bytes={pos}-{end - 1 if end is not None else ''}"
            async with self.http.stream("GET", self.object_url(name, **params), headers=headers,
                                        what="download") as resp:
                if resp.status_code == 404:
                    if generation:
                        raise StorageUnavailable(f"gcs download: {key} was replaced while being read")
                    raise KeyError(key)
                if resp.status_code == 416:  # from beyond the end: nothing
                    yield None
                    return
                if resp.status_code not in (200, 206):
                    await resp.aread()
                    raise unexpected("gcs", "download", resp)
                generation = resp.headers.get("x-goog-generation", "")
                yield resp

        async for piece in read_resuming(open_range, offset, end, chunk_size, self.limits.attempts, "gcs"):
            yield piece

    async def delete(self, key: str) -> bool:
        return await self.delete_object(join(self.prefix, check_key(key)))

    async def exists(self, key: str) -> bool:
        return await self.metadata(join(self.prefix, check_key(key))) is not None

    async def size(self, key: str) -> int:
        meta = await self.metadata(join(self.prefix, check_key(key)))
        if meta is None:
            raise KeyError(key)
        return int(meta["size"])

    async def keys(self) -> AsyncIterator[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        async for item in self._list(start, delimiter=True):
            name = item["name"][len(start):]
            if name and "/" not in name:
                yield name

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            with contextlib.suppress(BaseException):
                await self._sweep
        await self.http.aclose()

    # -- housekeeping -----------------------------------------------------------------------

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or (self._sweep is not None and not self._sweep.done()):
            return
        self._next_sweep = now + SWEEP_INTERVAL
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_logged())

    async def _sweep_logged(self) -> int:
        try:
            return await self.sweep_stale_uploads()
        except StorageError as err:
            log.warning("gcs: sweeping stale staging objects failed (next try in an hour): %s", err)
            return 0

    async def sweep_stale_uploads(self, older_than: float | None = None) -> int:
        """Delete staging objects under our prefix created more than `older_than` seconds ago
        (default `stale_after`); returns how many. Bounded to SWEEP_MAX_PAGES pages."""
        cutoff = time.time() - (self.stale_after if older_than is None else older_than)
        removed, seen = 0, 0
        async for item in self._list(join(self.prefix, STAGING) + "/", delimiter=False):
            seen += 1
            created = staged_at(item["name"])
            if created is None:
                created = dt.datetime.fromisoformat(item.get("timeCreated", "").replace("Z", "+00:00")).timestamp() \
                    if item.get("timeCreated") else time.time()
            if created < cutoff and await self.delete_object(item["name"]):
                removed += 1
            if seen >= SWEEP_MAX_PAGES * 1000:
                break
        if removed:
            log.info("gcs: removed %d stale staging objects under %s", removed, self.prefix or "the bucket root")
        return removed


async def open_gcs_blob_store(url: StoreUrl, data_dir: Path) -> GcsBlobStore:
    """`gs://bucket/prefix` (store/urls.py); credentials from the usual Google environment."""
    bucket, prefix = url.bucket_and_prefix()
    return GcsBlobStore(bucket, prefix)
