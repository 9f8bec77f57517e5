"""`--database-url` and `--blob-url`: parse them and open the implementation registered for the
URL's scheme. Unset, they mean SQLite and local disk in the data directory, as ever.

    sqlite:///abs/path.sqlite3            (default: sqlite://<data dir>/batchgate.sqlite3)
    file:///abs/path                      (default: file://<data dir>/files)
    postgresql://user:pass@host:port/db   s3://bucket/prefix   gs://bucket/prefix

Implementations register here by scheme, as "module:function" (imported only when a URL names
them, so a server on SQLite never imports a PostgreSQL driver or a cloud client). The function is
`async def open_…(url: StoreUrl, data_dir: Path)` returning a `Database` (metadata) or a
`BlobStore` (blobs). app.py (and `keys create`) are the only callers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from batchgate_server.store.ports import BlobStore, MetadataStore, UsageLedger

# scheme -> "module:function" (add a line to plug in an implementation)
DATABASES: dict[str, str] = {
    "sqlite": "batchgate_server.store.sqlite:open_database",
    "postgresql": "batchgate_server.store.postgres:open_database",
}
BLOB_STORES: dict[str, str] = {
    "file": "batchgate_server.store.blobs.local:open_blob_store",
    "s3": "batchgate_server.store.blobs.s3:open_s3_blob_store",
    "gs": "batchgate_server.store.blobs.gcs:open_gcs_blob_store",
}

DEFAULT_DATABASE_FILE = "batchgate.sqlite3"
DEFAULT_BLOB_DIR = "files"


class StoreUrlError(Exception):
    """A store URL that cannot be used (malformed, unknown scheme, implementation unavailable):
    the server does not start (exit code 2)."""


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store URL. `str()` and `redacted` never show a password."""

    flag: str  # "--database-url" or "--blob-url", for messages
    parts: SplitResult

    @property
    def scheme(self) -> str:
        return self.parts.scheme

    @property
    def redacted(self) -> str:
        p = self.parts
        if p.password is None:
            return p.geturl()
        netloc = f"{p.username or ''}:***@{p.hostname or ''}" + (f":{p.port}" if p.port else "")
        return p._replace(netloc=netloc).geturl()

    def __str__(self) -> str:
        return self.redacted

    def error(self, message: str) -> StoreUrlError:
        return StoreUrlError(f"{self.flag} {self.redacted}: {message}")

    def local_path(self) -> Path:
        """The absolute path of a `scheme:///abs/path` URL (sqlite, file)."""
        p = self.parts
        if p.netloc not in ("", "localhost"):
            raise self.error(f"a {p.scheme} URL names a local path, not a host: {p.scheme}:///absolute/path")
        if p.query or p.fragment:
            raise self.error(f"a {p.scheme} URL takes no query or fragment")
        path = Path(unquote(p.path))
        if not path.is_absolute() or path == Path("/"):
            raise self.error(f"the path must be absolute: {p.scheme}:///absolute/path")
        return path

    def bucket_and_prefix(self) -> tuple[str, str]:
        """(bucket, prefix) of a `scheme://bucket/prefix` URL (s3, gs); the prefix may be empty."""
        p = self.parts
        if not p.hostname or p.username is not None or p.password is not None or p.port is not None:
            raise self.error(f"expected {p.scheme}://bucket/prefix")
        if p.query or p.fragment:
            raise self.error(f"a {p.scheme} URL takes no query or fragment")
        prefix = unquote(p.path).strip("/")
        if any(part in ("", ".", "..") or part.startswith(".") for part in prefix.split("/")) and prefix:
            raise self.error("the prefix has an empty, '.' or '..' segment, or one starting with '.'")
        return p.netloc, prefix


def parse_url(flag: str, text: str) -> StoreUrl:
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as err:
        raise StoreUrlError(f"{flag}: not a URL ({err})") from None
    if not parts.scheme:
        raise StoreUrlError(f"{flag} {text!r}: not a URL (expected scheme://…)")
    return StoreUrl(flag, parts._replace(scheme=parts.scheme.lower()))


def _local_uri(scheme: str, path: Path) -> str:
    return scheme + path.resolve().as_uri()[len("file"):]


def database_url(text: str, data_dir: Path) -> StoreUrl:
    """`--database-url`, or SQLite in the data directory when it is empty."""
    return parse_url("--database-url", text or _local_uri("sqlite", data_dir / DEFAULT_DATABASE_FILE))


def blob_url(text: str, data_dir: Path) -> StoreUrl:
    """`--blob-url`, or local disk in the data directory when it is empty."""
    return parse_url("--blob-url", text or _local_uri("file", data_dir / DEFAULT_BLOB_DIR))


@dataclass
class Database:
    """The metadata store and the usage ledger over one database (they share its connections)."""

    metadata: MetadataStore
    ledger: UsageLedger

    async def close(self) -> None:
        await self.metadata.close()


def _opener(url: StoreUrl, registry: dict[str, str], what: str):
    target = registry.get(url.scheme)
    if target is None:
        known = ", ".join(f"{scheme}://" for scheme in sorted(registry))
        raise url.error(f"no {what} for the scheme {url.scheme!r} in this build (available: {known})")
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise url.error(f"the {url.scheme} {what} is not available: {err}") from None


async def open_database(url: StoreUrl, data_dir: Path) -> Database:
    return await _opener(url, DATABASES, "metadata store")(url, data_dir)


async def open_blob_store(url: StoreUrl, data_dir: Path) -> BlobStore:
    return await _opener(url, BLOB_STORES, "blob store")(url, data_dir)
