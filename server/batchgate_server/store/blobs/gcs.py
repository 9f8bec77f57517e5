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
    PART_SIZE, SWEEP_MAX_PAGES, CallLimits, HttpBackend, RemoteBlobStore, RemoteBlobWriter, staged_at, unexpected,
)
from batchgate_server.store.errors import StorageError, StorageUnavailable
from batchgate_server.store.urls import StoreUrl

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
_REWRITE_ROUNDS = 100  # rewrites across locations or classes take several calls; ours take one


def _q(name: str) -> str:
    return quote(name, safe="")


class GcsBlobWriter(RemoteBlobWriter):
    _store: GcsBlobStore

    def __init__(self, store: GcsBlobStore) -> None:
        super().__init__(store, in_flight=1)  # a session takes its chunks in order
        self._session = ""
        self._sent = 0  # bytes the session has acknowledged
        self._finalised = False

    async def _begin(self, name: str = "") -> None:
        resp = await self._store.http.call(
            "POST", self._store.upload_url(name or self._staging, "resumable"), body=b"{}",
            headers={"Content-Type": "application/json", "X-Upload-Content-Type": "application/octet-stream"},
            what="start resumable upload")
        if resp.status_code != 200 or "location" not in resp.headers:
            raise unexpected("gcs", "start resumable upload", resp)
        self._session = resp.headers["location"]

    async def _send_part(self, number: int, data: bytes) -> None:
        await self._send_chunk(data)

    async def _send_chunk(self, data: bytes, total: int | None = None) -> None:
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

    async def _commit(self, name: str) -> int:
        size = self._parts.size
        if size == 0:
            # One resumable request stating a total of 0: gcp-storage-emulator fails an empty
            # simple upload.
            await self._begin(name)
            await self._send_chunk(b"", total=0)
        elif self._parts.parts == 0:
            resp = await self._store.http.call("POST", self._store.upload_url(name, "media"), body=self._parts.tail(),
                                               headers={"Content-Type": "application/octet-stream"}, what="upload")
            if resp.status_code != 200:
                raise unexpected("gcs", "upload", resp)
        else:
            tail = self._parts.tail()
            await self._parts.finish(b"")
            await self._send_chunk(tail, total=size)
            await self._store.rewrite(self._staging, name)
            await self._store.delete_object(self._staging)
        return size

    async def _discard(self) -> None:
        if self._finalised:
            await self._store.delete_object(self._staging)
        elif self._session:
            # GCS answers a cancelled session with 499; emulators may not know the verb.
            await self._store.http.call("DELETE", self._session, what="cancel resumable upload")


class GcsBlobStore(RemoteBlobStore):
    service = "gcs"

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 limits: CallLimits = CallLimits(), part_size: int = PART_SIZE,
                 stale_after: float = 24 * 3600.0) -> None:
        super().__init__(prefix, limits, part_size, stale_after)
        self.bucket = bucket
        emulator = endpoint_url or os.environ.get(EMULATOR_ENV, "")
        if emulator and "://" not in emulator:
            emulator = f"http://{emulator}"
        self._anonymous = bool(emulator)
        self._base = emulator.rstrip("/") if emulator else "https://storage.googleapis.com"
        self._credentials: Any = None
        self.http = HttpBackend("gcs", self._authorise, limits)

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

    def _writer(self) -> GcsBlobWriter:
        return GcsBlobWriter(self)

    def _ranged_get(self, name: str, version: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        # The generation pins the object read first: a resumed read never mixes two versions.
        return self.object_url(name, alt="media", **({"generation": version} if version else {})), headers

    def _version(self, resp: httpx.Response) -> str:
        return resp.headers.get("x-goog-generation", "")

    async def delete(self, key: str) -> bool:
        return await self.delete_object(self.name_of(key))

    async def exists(self, key: str) -> bool:
        return await self.metadata(self.name_of(key)) is not None

    async def size(self, key: str) -> int:
        meta = await self.metadata(self.name_of(key))
        if meta is None:
            raise KeyError(key)
        return int(meta["size"])

    async def keys(self) -> AsyncIterator[str]:
        start = self.key_prefix
        async for item in self._list(start, delimiter=True):
            name = item["name"][len(start):]
            if name and "/" not in name:
                yield name

    # -- housekeeping -----------------------------------------------------------------------

    async def sweep_stale_uploads(self, older_than: float | None = None) -> int:
        """Delete staging objects under our prefix created more than `older_than` seconds ago
        (default `stale_after`); returns how many. Bounded to SWEEP_MAX_PAGES pages."""
        cutoff = self._cutoff(older_than)
        removed, seen = 0, 0
        async for item in self._list(self.staging_prefix, delimiter=False):
            seen += 1
            created = staged_at(item["name"])
            if created is None:
                created = dt.datetime.fromisoformat(item.get("timeCreated", "").replace("Z", "+00:00")).timestamp() \
                    if item.get("timeCreated") else time.time()
            if created < cutoff and await self.delete_object(item["name"]):
                removed += 1
            if seen >= SWEEP_MAX_PAGES * 1000:
                break
        return removed


async def open_gcs_blob_store(url: StoreUrl, data_dir: Path) -> GcsBlobStore:
    """`gs://bucket/prefix` (store/urls.py); credentials from the usual Google environment."""
    bucket, prefix = url.bucket_and_prefix()
    return GcsBlobStore(bucket, prefix)
