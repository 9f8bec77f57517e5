"""What the master key (AdminService) and the `batchgate-server keys` commands do: project API
keys and project quotas. Every use case takes the caller's Principal and refuses a project key."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from batchgate_server.core.auth import Principal, create_api_key
from batchgate_server.core.errors import PermissionDenied, echo, not_found
from batchgate_server.core.errors import invalid_field as _invalid
from batchgate_server.core.files import CONTROL_CHARACTER, FileManager
from batchgate_server.core.pagination import PageTokens
from batchgate_server.core.quotas import Quotas, month_start
from batchgate_server.domain.models import ApiKeyRecord, ProjectQuota
from batchgate_server.store.ports import LedgerFilter, MetadataStore

PROJECT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_KEY_NAME = 128
QUOTA_LIMITS = ("max_running_batches", "max_stored_bytes", "max_uploads", "monthly_budget_nanos")


def check_project(project: str, field_name: str = "project") -> None:
    if not PROJECT_NAME.fullmatch(project):
        raise _invalid(f"project {echo(project)} must be 1 to 64 letters, digits, '-', '_' or '.'",
                       "INVALID_PROJECT", field_name, "1 to 64 of [A-Za-z0-9._-]")


def check_key_name(name: str) -> None:
    if len(name) > MAX_KEY_NAME or CONTROL_CHARACTER.search(name):
        raise _invalid(f"the key name must be at most {MAX_KEY_NAME} characters without control characters",
                       "INVALID_KEY_NAME", "name", f"at most {MAX_KEY_NAME} printable characters")


def check_quota(quota: ProjectQuota) -> None:
    check_project(quota.project, "quota.project")
    for limit in QUOTA_LIMITS:
        value = getattr(quota, limit)
        if value is not None and value < 0:
            name = "monthly_budget" if limit == "monthly_budget_nanos" else limit
            raise _invalid(f"quota.{name} must not be negative", "INVALID_QUOTA", f"quota.{name}", "must be >= 0")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("only the master key may manage keys and quotas", "ADMIN_KEY_REQUIRED")


class Admin:
    def __init__(self, store: MetadataStore, quotas: Quotas, files: FileManager, page_tokens: PageTokens) -> None:
        self.store = store
        self.quotas = quotas
        self.files = files
        self.page_tokens = page_tokens

    async def create_key(self, principal: Principal, project: str, name: str = "",
                         expires_at: float | None = None) -> tuple[ApiKeyRecord, str]:
        require_admin(principal)
        return await create_checked_key(self.store, project, name, expires_at)

    async def list_keys(self, principal: Principal, project: str, size: int, token: str,
                        weigh: Callable[[ApiKeyRecord], int]) -> tuple[list[ApiKeyRecord], str]:
        require_admin(principal)
        if project:
            check_project(project)
        return await self.page_tokens.keyset_page(
            size, token, f"api_keys|{project}",
            lambda limit, after: self.store.list_api_keys(project or None, limit, after), weigh)

    async def revoke_key(self, principal: Principal, key_id: str) -> ApiKeyRecord:
        require_admin(principal)
        return await revoke_key(self.store, key_id)

    async def set_quota(self, principal: Principal, quota: ProjectQuota) -> ProjectQuota:
        require_admin(principal)
        check_quota(quota)
        await self.store.set_project_quota(quota)
        return quota

    async def get_quota(self, principal: Principal, project: str) -> QuotaReport:
        require_admin(principal)
        check_project(project)
        stored = await self.store.get_project_quota(project)
        configured = self.quotas.configured.get(project)
        quota = stored or configured or ProjectQuota(project)
        spend = await self.quotas.ledger.totals(LedgerFilter(start=month_start(time.time()), project=project))
        return QuotaReport(quota, "api" if stored else "config" if configured else "none",
                           running_batches=await self.store.count_unfinished_batches(project),
                           stored_bytes=await self.store.stored_bytes(project),
                           uploads_in_flight=self.files.uploads_in_progress(project),
                           monthly_spend_nanos=spend.cost_nanos)


@dataclass
class QuotaReport:
    quota: ProjectQuota
    source: str  # "api", "config" or "none"
    running_batches: int
    stored_bytes: int
    uploads_in_flight: int
    monthly_spend_nanos: int


async def create_checked_key(store: MetadataStore, project: str, name: str = "",
                             expires_at: float | None = None) -> tuple[ApiKeyRecord, str]:
    """A new key after checking what the caller sent (shared by AdminService and the CLI)."""
    check_project(project)
    check_key_name(name)
    if expires_at is not None and expires_at <= time.time():
        raise _invalid("expire_time must be in the future", "INVALID_EXPIRE_TIME", "expire_time", "a future time")
    return await create_api_key(store, project, name, expires_at)


async def revoke_key(store: MetadataStore, key_id: str) -> ApiKeyRecord:
    revoked = await store.revoke_api_key(key_id, time.time()) if key_id else None
    if revoked is None:
        raise not_found("api_key", key_id)
    return revoked
