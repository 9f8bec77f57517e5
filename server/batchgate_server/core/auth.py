"""API keys: a master key from the environment plus project keys stored hashed.

Keys are long random secrets, so one SHA-256 is enough to store them safely
(no password stretching needed) and lets a lookup be a single indexed read.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from batchgate_server.core.errors import Unauthenticated
from batchgate_server.domain.ids import new_key_secret
from batchgate_server.store.ports import MetadataStore

DEFAULT_PROJECT = "default"


@dataclass(frozen=True)
class Principal:
    project: str  # where what it creates belongs
    key_id: str  # never the secret: safe to log and to record on batches
    is_admin: bool = False  # the master key (or an open loopback server) sees every project

    def can_see(self, project: str) -> bool:
        return self.is_admin or project == self.project

    @property
    def scope(self) -> str | None:
        """The project filter for listings: None means every project."""
        return None if self.is_admin else self.project


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Authenticator:
    def __init__(self, store: MetadataStore, master_key: str) -> None:
        self._store = store
        self._master_key = master_key
        self.open = False  # set by start(): no key configured at all

    async def start(self) -> None:
        self.open = not self._master_key and await self._store.count_api_keys() == 0

    async def authenticate(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Principal:
        if self.open:
            return Principal(DEFAULT_PROJECT, "open", is_admin=True)
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        if not header:
            raise Unauthenticated("missing 'authorization: Bearer <key>' (gRPC metadata or HTTP header)",
                                  "MISSING_API_KEY")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated("authorization must be 'Bearer <key>'", "MALFORMED_API_KEY")
        secret = secret.strip()
        # As bytes: compare_digest refuses non-ASCII strings, and an HTTP header may hold any bytes
        # (decoded with surrogates where they are no UTF-8).
        if self._master_key and hmac.compare_digest(secret.encode("utf-8", "surrogatepass"),
                                                    self._master_key.encode("utf-8", "surrogatepass")):
            return Principal(DEFAULT_PROJECT, "master", is_admin=True)
        if not secret.isascii():  # project keys are ASCII (new_key_secret)
            raise Unauthenticated("invalid API key", "INVALID_API_KEY")
        found = await self._store.find_api_key(hash_key(secret))
        if found is None:
            raise Unauthenticated("invalid API key", "INVALID_API_KEY")
        key_id, project = found
        return Principal(project, key_id)


async def create_api_key(store: MetadataStore, project: str) -> tuple[str, str]:
    """Create a key for `project`; returns (key_id, secret). The secret is not stored."""
    secret = new_key_secret()
    key_hash = hash_key(secret)
    key_id = "key_" + key_hash[:12]
    await store.add_api_key(key_hash, key_id, project, time.time())
    return key_id, secret
