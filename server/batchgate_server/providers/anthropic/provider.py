"""Anthropic Message Batches adapter: OpenAI /v1/chat/completions batches run on Claude.

Deployment.params (LiteLLM litellm_params, secrets already resolved):

=================  =====================================================================
api_key            required (sent as ``x-api-key``)
api_base           default https://api.anthropic.com (a trailing /v1 is accepted)
anthropic_version  ``anthropic-version`` header, default 2023-06-01
timeout            seconds per HTTP operation (connect capped at 10 s), default 60
max_retries        retries after the first attempt on 429/5xx/network errors, default 3
backoff_base       first backoff step in seconds (exponential, jittered), default 0.5
default_max_tokens max_tokens for requests that set none (Anthropic requires it), default 4096
poll_interval      seconds between polls (read by the tracker; class default 10)
create_lookup_patience, not_found_grace   see providers/eventual.py (defaults 30 s and 300 s)
=================  =====================================================================

How a job runs
--------------
submit() streams the input once through translate.py into three files in ``job.workdir``:

* ``anthropic_body.json`` - the exact create body ``{"requests":[...]}``, written line by line
  (memory stays flat) and sent from disk in 256 KiB chunks with a Content-Length, so the
  256 MB limit is checked *before* anything is sent and a retried POST re-reads the file
  instead of translating again. Deleted once Anthropic has accepted it;
* ``anthropic_ids.jsonl`` - one ``[provider_custom_id, line_no(, original_custom_id)]`` per
  sent request: results come back in any order and are matched by id; ids Anthropic can't
  take (``^[a-zA-Z0-9_-]{1,64}$``) travel as ``bgl_<line_no>`` (providers/custom_ids.py);
* ``anthropic_translation_errors.jsonl`` - the error-file lines of requests that couldn't be
  translated (e.g. n=2); they are never sent and results() yields them after Anthropic's.

These live in the workdir rather than in ``job.state`` because the state is rewritten with
every revision of the batch (each poll that changes counts); 100,000 remapped ids would make
every revision megabytes. The files are derived deterministically from the input, so if they
are lost results() rebuilds them by translating the input again (no body written).

If every line fails translation Anthropic is not called: the job completes with error lines
only.

job.state keys: ``requests_sent``, ``not_sent`` (untranslatable lines), ``create_started_at``
and ``created_after`` (set before POST /v1/messages/batches), ``create_ended_at`` (when it
failed), ``msgbatch_id``,
``provider_created_at``, ``nothing_sent``, ``cancel_sent``, ``abandoned_create``.

At most one message batch per batch
-----------------------------------
Message Batches carry no metadata or idempotency key, so a create that may have reached
Anthropic without us saving its id (a crash, or a network failure after the body was sent) is
found again by what the listing does show:

* creates are serialised per account (api_base + api_key) in this process, so at most one
  create is ever unresolved per account, and it is the only one of ours in its time window;
* before the POST the state records ``create_started_at`` and ``created_after``: the newest
  message batch this process created on the account and the newest one listed, i.e. batches
  the new one is certainly younger than;
* a submit that finds ``create_started_at`` but no ``msgbatch_id`` lists the account's batches
  (newest first) and adopts the oldest one younger than ``created_after``, created between
  ``create_started_at`` and the end of the call (``create_ended_at``, else of its timeout; give
  or take CLOCK_SKEW), holding
  exactly ``requests_sent`` requests and not known to belong to another batch. It looks again
  while the listing may lag (``create_lookup_patience``) before it ever creates again;
* if it does create again, the lost create's window is kept (``abandoned_create``) and each
  poll looks for it for a while longer: found late, it is cancelled at once;
* a batch that ends before its create was resolved (cancelled after a crash during the create)
  has that create looked for the same way by ``release()``, and cancelled;
* results are matched by custom id: a request of ours missing from them becomes an error line
  (``provider_result_missing``), a result that isn't ours is skipped.

The residual risk is another client of the same workspace creating a batch of exactly the same
size within seconds of a create that batchgate lost. Only failures where the request certainly
never arrived (connect errors, 429/502/503/504) are retried inline.

A 404 for the batch within ``not_found_grace`` seconds of its create is "not visible yet"
(retried); after that it fails the batch with ``provider_job_not_found``.

Status mapping: see mapping.py (ended -> cancelled / expired / completed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from batchgate_server.domain.models import RequestCounts
from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.base import (
    BatchProvider,
    Deployment,
    JobStatus,
    PollResult,
    ProviderError,
    ProviderJob,
    ResultKind,
    ResultLine,
    UnsupportedRequest,
)
from batchgate_server.providers.custom_ids import LONGEST_LINE_NO, anthropic_codec
from batchgate_server.providers.eventual import Consistency, create_call
from batchgate_server.providers.openai_batch.client import ApiClient, Conn
from batchgate_server.providers.params import float_param, int_param

from . import mapping
from .translate import (
    DEFAULT_MAX_TOKENS,
    TranslationError,
    anthropic_result_to_openai,
    batch_request_line,
    chat_to_anthropic_params,
    provider_error_line,
    translation_error_line,
)

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)
MAX_REQUESTS = 100_000
MAX_BODY_BYTES = 256_000_000  # "256 MB" per batch; decimal megabytes, the stricter reading
# The create body is {"requests":[<request>,<request>,...]}: request_size counts each request with
# one comma, the envelope comes off the byte limit.
_BODY_ENVELOPE = len(b'{"requests":[]}')
BATCHES_PATH = "/v1/messages/batches"
LABEL = "Anthropic"

BODY_FILE = "anthropic_body.json"
IDS_FILE = "anthropic_ids.jsonl"
ERRORS_FILE = "anthropic_translation_errors.jsonl"
CHUNK = 256 * 1024
_YIELD_EVERY = 500  # lines translated between two chances for the event loop to run others
CLOCK_SKEW = 2.0  # seconds Anthropic's created_at may differ from our clock
LOOKUP_PAGES = 5  # pages of LOOKUP_PAGE batches searched for a lost create
LOOKUP_PAGE = 100
MAX_CLAIMED = 20_000  # message batch ids remembered per account as belonging to known batches


def _max_tokens(deployment: Deployment) -> int:
    return int_param(deployment.params, "default_max_tokens", DEFAULT_MAX_TOKENS)


def _translated(raw: bytes, line_no: int, *, model: str, max_tokens: int) -> tuple[str, dict | TranslationError]:
    """(custom_id, the Messages API params) of input line `line_no`, or (custom_id, why it cannot be
    sent): what _prepare sends and request_size measures."""
    custom_id = f"line-{line_no}"
    try:
        try:
            line = json.loads(raw)
        except ValueError:
            raise TranslationError("body", "the input line is not valid JSON") from None
        if not isinstance(line, dict):
            raise TranslationError("body", "the input line is not a JSON object")
        if isinstance(line.get("custom_id"), str):
            custom_id = line["custom_id"]
        return custom_id, chat_to_anthropic_params(line.get("body"), model=model, default_max_tokens=max_tokens)
    except TranslationError as err:
        return custom_id, err


@dataclass
class _Prepared:
    sent: int
    not_sent: int
    body_bytes: int


@dataclass(frozen=True)
class _Entry:
    line_no: int
    original: str


@dataclass
class _Account:
    """What this process knows of one Anthropic account (api_base + api_key)."""

    create_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_created: str | None = None  # the newest message batch this process created or adopted
    # Message batches of batches we know, most recently seen last (a dict keeps that order).
    claimed: dict[str, None] = field(default_factory=dict)

    def claim(self, bid: str, *, newest: bool = False) -> None:
        self.claimed.pop(bid, None)
        self.claimed[bid] = None
        if len(self.claimed) > MAX_CLAIMED:  # only recent ones can fall in a lost create's window
            del self.claimed[next(iter(self.claimed))]
        if newest:
            self.last_created = bid


class AnthropicBatchProvider(BatchProvider):
    name = "anthropic"
    poll_interval = 10.0
    job_limits = JobLimits(max_requests=MAX_REQUESTS, max_bytes=MAX_BODY_BYTES - _BODY_ENVELOPE)

    def __init__(self, *, http_client: httpx.AsyncClient | None = None) -> None:
        self._api = ApiClient(http_client)
        self._accounts: dict[tuple[str, str], _Account] = {}

    def _account(self, conn: Conn) -> _Account:
        key = hashlib.sha256(conn.headers["x-api-key"].encode()).hexdigest()
        return self._accounts.setdefault((conn.base_url, key), _Account())

    # ------------------------------------------------------------------ configuration
    def _conn(self, dep: Deployment) -> Conn:
        p = dep.params
        if not p.get("api_key"):
            raise ProviderError("the Anthropic deployment has no api_key", code="provider_not_configured",
                                retryable=False)
        base = str(p.get("api_base") or DEFAULT_API_BASE).rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        headers = {"x-api-key": str(p["api_key"]),
                   "anthropic-version": str(p.get("anthropic_version") or ANTHROPIC_VERSION)}
        return Conn(label=LABEL, base_url=base, headers=headers, timeout=float_param(p, "timeout", 60.0),
                    max_retries=max(0, int_param(p, "max_retries", 3)),
                    backoff_base=max(0.0, float_param(p, "backoff_base", 0.5)),
                    requests=self.counted(dep))

    def probes(self, deployment: Deployment) -> bool:
        return bool(deployment.params.get("api_key"))

    async def probe(self, deployment: Deployment) -> None:
        conn = dataclasses.replace(self._conn(deployment), max_retries=0, requests=None)
        await self._api.request_json(conn, "GET", "/v1/models")

    # ------------------------------------------------------------------ BatchProvider
    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise UnsupportedRequest(
                f"Anthropic Message Batches only run {', '.join(SUPPORTED_ENDPOINTS)} batches "
                f"(translated to the Messages API); {endpoint} is not supported",
                reason="UNSUPPORTED_ENDPOINT",
                details={"endpoint": endpoint, "supported_endpoints": ",".join(SUPPORTED_ENDPOINTS)})
        if not deployment.params.get("api_key"):
            raise UnsupportedRequest(
                f"deployment {deployment.model_name!r} has no api_key for Anthropic",
                reason="PROVIDER_NOT_CONFIGURED", precondition=True,
                details={"deployment": deployment.id})

    def request_size(self, endpoint: str, deployment: Deployment, line: bytes) -> int:
        """The request as it goes in the create body's `requests` array (translated to the Messages
        API, its custom_id remapped if Anthropic cannot take it), with its comma; 0 for a line that
        cannot be translated (it is never sent: an error line here)."""
        custom_id, params = _translated(line, LONGEST_LINE_NO, model=deployment.model,
                                        max_tokens=_max_tokens(deployment))
        if isinstance(params, TranslationError):
            return 0
        return len(batch_request_line(anthropic_codec().encode(custom_id, LONGEST_LINE_NO), params)) + 1

    def job_id(self, state: Mapping[str, Any]) -> str:
        return str(state.get("msgbatch_id") or "")

    async def submit(self, job: ProviderJob) -> None:
        st = job.state
        if st.get("msgbatch_id") or st.get("nothing_sent"):
            return
        conn = self._conn(job.deployment)
        body_path = job.workdir / BODY_FILE
        prepared = await self._prepare(job, write_body=True)
        if prepared.sent == 0:
            log.info("batch %s: none of its %d requests can run on Anthropic; not creating a batch",
                     job.batch_id, prepared.not_sent)
            body_path.unlink(missing_ok=True)
            st.update(nothing_sent=True, requests_sent=0, not_sent=prepared.not_sent)
            await job.save_state()
            return
        account = self._account(conn)
        # One create in flight per account: a lost one is then alone in its time window.
        async with account.create_lock:
            if st.get("create_started_at"):
                consistency = Consistency.from_params(job.deployment.params)
                lost = self._lost_create(st, prepared.sent)
                found = await consistency.look_for_create(
                    lambda: self._find_created(conn, account, lost),
                    consistency.lookup_deadline(lost["started_at"], conn.timeout, lost["ended_at"]))
                if found:
                    log.info("batch %s: adopting Anthropic message batch %s created before an "
                             "interruption", job.batch_id, found)
                    await self._created(job, account, found)
                    body_path.unlink(missing_ok=True)
                    return
                log.warning("batch %s: the Anthropic create started at %s is not listed after %.0fs of "
                            "looking; creating the batch again (a late copy will be cancelled)", job.batch_id,
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lost["started_at"])),
                            time.time() - lost["started_at"])
                st["abandoned_create"] = lost
            newest = await self._newest_listed(conn)
            st.pop("create_ended_at", None)
            st.update(create_started_at=time.time(), requests_sent=prepared.sent, not_sent=prepared.not_sent,
                      created_after=sorted({i for i in (account.last_created, newest) if i}))
            await job.save_state()
            async with create_call(job):
                bid = await self._create(conn, prepared, body_path)
            await self._created(job, account, bid)
        body_path.unlink(missing_ok=True)
        log.info("batch %s: Anthropic message batch %s created with %d requests (%d not sent)",
                 job.batch_id, bid, prepared.sent, prepared.not_sent)

    async def _create(self, conn: Conn, prepared: _Prepared, body_path) -> str:

        def body() -> AsyncIterator[bytes]:
            async def chunks() -> AsyncIterator[bytes]:
                with open(body_path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        yield chunk
            return chunks()

        obj = await self._api.request_json(
            conn, "POST", BATCHES_PATH, content=body, idempotent=False,
            headers={"content-type": "application/json", "content-length": str(prepared.body_bytes)})
        bid = obj.get("id")
        if not isinstance(bid, str) or not bid:
            raise ProviderError(f"Anthropic POST {BATCHES_PATH} answered without an id",
                                code="provider_bad_response", retryable=True)
        return bid

    async def _created(self, job: ProviderJob, account: _Account, bid: str) -> None:
        job.state.update(msgbatch_id=bid, provider_created_at=time.time())
        await job.save_state()
        account.claim(bid, newest=True)

    @staticmethod
    def _lost_create(st: dict, sent: int) -> dict:
        """What identifies the create a crash (or a lost answer) left unresolved."""
        return {"started_at": float(st["create_started_at"]), "ended_at": st.get("create_ended_at"),
                "sent": sent, "created_after": list(st.get("created_after") or [])}

    async def _newest_listed(self, conn: Conn) -> str | None:
        page = await self._api.request_json(conn, "GET", BATCHES_PATH, params={"limit": 1})
        data = page.get("data") or []
        newest = data[0].get("id") if data and isinstance(data[0], dict) else None
        return newest if isinstance(newest, str) else None

    async def _find_created(self, conn: Conn, account: _Account, lost: dict) -> str | None:
        """The message batch the lost create made, if listed yet (see the module docstring)."""
        earliest = lost["started_at"] - CLOCK_SKEW
        latest = (lost.get("ended_at") or lost["started_at"] + conn.timeout) + CLOCK_SKEW
        older = set(lost["created_after"])
        found: str | None = None
        after: str | None = None
        for _ in range(LOOKUP_PAGES):
            params: dict = {"limit": LOOKUP_PAGE, **({"after_id": after} if after else {})}
            page = await self._api.request_json(conn, "GET", BATCHES_PATH, params=params)
            data = page.get("data") or []
            for obj in data:
                try:
                    info = mapping.parse_batch(obj)
                except ValueError:
                    continue
                if info.id in older or (info.created_at is not None and info.created_at < earliest):
                    return found  # newest first: everything further is older than our create
                if info.created_at is None or info.created_at > latest or info.id in account.claimed:
                    continue
                if info.total == lost["sent"]:
                    found = info.id  # keep going: the oldest match is the first create after the marker
            if not page.get("has_more") or not data:
                break
            after = page.get("last_id") or data[-1].get("id")
        return found

    async def _cancel_late_duplicate(self, conn: Conn, job: ProviderJob) -> None:
        """After a create was repeated, look (for a while) for the lost one and cancel it."""
        st = job.state
        lost = st["abandoned_create"]
        consistency = Consistency.from_params(job.deployment.params)
        watch_until = consistency.duplicate_watch_until(
            consistency.lookup_deadline(lost["started_at"], conn.timeout, lost.get("ended_at")))
        account = self._account(conn)
        account.claim(st["msgbatch_id"])
        dup = await self._find_created(conn, account, lost)
        if dup is not None:
            log.warning("batch %s: cancelling Anthropic message batch %s, a late-listed duplicate of %s",
                        job.batch_id, dup, st["msgbatch_id"])
            try:
                await self._api.request_json(conn, "POST", f"{BATCHES_PATH}/{dup}/cancel")
            except ProviderError as e:
                if e.code not in ("provider_invalid_request", "provider_not_found"):
                    raise
            account.claim(dup)
        if dup is not None or time.time() > watch_until:
            del st["abandoned_create"]
            await job.save_state()

    async def release(self, job: ProviderJob) -> None:
        """Nothing of ours stays at Anthropic (the requests go in the create's body, results expire
        there), except the message batch of a create whose answer was lost when the batch ended
        without it (cancelled after a crash during the create): that one is looked for and cancelled."""
        st = job.state
        if st.get("msgbatch_id") or not st.get("create_started_at"):
            return
        conn = self._conn(job.deployment)
        account = self._account(conn)
        consistency = Consistency.from_params(job.deployment.params)
        lost = self._lost_create(st, int(st.get("requests_sent") or 0))
        async with account.create_lock:  # as in submit: the lost create is alone in its window
            found = await consistency.look_for_create(
                lambda: self._find_created(conn, account, lost),
                consistency.lookup_deadline(lost["started_at"], conn.timeout, lost["ended_at"]))
        if found is None:
            return
        log.warning("batch %s: ended while its Anthropic create was unresolved; cancelling message batch %s "
                    "that create made", job.batch_id, found)
        account.claim(found)
        try:
            await self._api.request_json(conn, "POST", f"{BATCHES_PATH}/{found}/cancel")
        except ProviderError as e:
            if e.code not in ("provider_invalid_request", "provider_not_found"):
                raise

    async def poll(self, job: ProviderJob) -> PollResult:
        st = job.state
        cancel_requested = bool(st.get("cancel_sent")) or job.cancel_requested.is_set()
        not_sent = int(st.get("not_sent") or 0)
        bid = st.get("msgbatch_id")
        if not bid:
            if st.get("nothing_sent"):
                status = JobStatus.CANCELLED if cancel_requested else JobStatus.COMPLETED
                return PollResult(status, RequestCounts(job.line_count, 0, not_sent),
                                  detail="nothing was sent to Anthropic")
            if cancel_requested:  # cancelled before it was submitted
                return PollResult(JobStatus.CANCELLED, None, detail="cancelled before submission")
            raise ProviderError(f"batch {job.batch_id} has no Anthropic message batch id (not submitted)",
                                code="provider_job_not_found", retryable=False)
        conn = self._conn(job.deployment)
        if st.get("abandoned_create"):
            await self._cancel_late_duplicate(conn, job)
        obj = await self._job_call(conn, job, "GET", f"{BATCHES_PATH}/{bid}")
        try:
            return mapping.batch_to_poll_result(obj, total=job.line_count, not_sent=not_sent,
                                                cancel_requested=cancel_requested)
        except ValueError as e:
            raise ProviderError(f"Anthropic message batch {bid}: {e}", code="provider_bad_response",
                                retryable=True) from e

    async def cancel(self, job: ProviderJob) -> None:
        st = job.state
        bid = st.get("msgbatch_id")
        if not bid:
            return  # nothing at Anthropic (or an unresolved create: see the module docstring)
        conn = self._conn(job.deployment)
        try:
            await self._job_call(conn, job, "POST", f"{BATCHES_PATH}/{bid}/cancel")
        except ProviderError as e:
            if e.code != "provider_invalid_request":
                raise
            # Typically "already ended": the next poll says how it ended.
            log.info("batch %s: Anthropic refused the cancel of %s: %s", job.batch_id, bid, e.message)
        if not st.get("cancel_sent"):
            st["cancel_sent"] = True
            await job.save_state()

    async def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        st = job.state
        bid = st.get("msgbatch_id")
        if not bid and not st.get("nothing_sent"):
            return  # cancelled before anything was submitted: no lines
        index = await self._load_index(job)
        if bid:
            conn = self._conn(job.deployment)
            obj = await self._job_call(conn, job, "GET", f"{BATCHES_PATH}/{bid}")
            try:
                info = mapping.parse_batch(obj)
            except ValueError as e:
                raise ProviderError(f"Anthropic message batch {bid}: {e}", code="provider_bad_response",
                                    retryable=True) from e
            if info.processing_status != "ended":
                raise ProviderError(f"Anthropic message batch {bid} has not ended yet "
                                    f"({info.processing_status})", code="provider_not_ready", retryable=True)
            created = int(info.ended_at or time.time())
            seen: set[str] = set()
            bad = 0
            try:
                async for raw in self._api.stream_lines(conn, self._results_path(conn, bid, info)):
                    try:
                        obj = json.loads(raw)
                        pid = obj["custom_id"]
                        entry = index[pid]
                    except (ValueError, KeyError, TypeError):
                        bad += 1
                        continue
                    if pid in seen:
                        continue
                    seen.add(pid)
                    yield anthropic_result_to_openai(obj, original_custom_id=entry.original,
                                                     request_index=entry.line_no, batch_id=job.batch_id,
                                                     created=created)
            except ProviderError as e:
                if e.code == "provider_not_found":
                    raise ProviderError(f"the results of Anthropic message batch {bid} are gone (deleted, "
                                        f"or past Anthropic's 29-day retention)",
                                        code="provider_result_missing", retryable=False) from e
                raise
            if bad:
                log.warning("batch %s: skipped %d unreadable or unknown result line(s) from %s",
                            job.batch_id, bad, bid)
            if len(seen) < len(index):
                log.warning("batch %s: Anthropic returned no result for %d request(s) of %s",
                            job.batch_id, len(index) - len(seen), bid)
                for pid, entry in index.items():
                    if pid not in seen:
                        yield provider_error_line(
                            entry.original, code="provider_result_missing",
                            message=f"Anthropic message batch {bid} returned no result for this request",
                            request_index=entry.line_no, batch_id=job.batch_id)
        errors_path = job.workdir / ERRORS_FILE
        if errors_path.exists():
            with open(errors_path, "rb") as fh:
                for raw in fh:
                    raw = raw.rstrip(b"\n")
                    if raw:
                        yield ResultLine(ResultKind.ERROR, raw)

    async def close(self) -> None:
        await self._api.aclose()

    # ------------------------------------------------------------------ helpers
    def _results_path(self, conn: Conn, bid: str, info: mapping.BatchInfo) -> str:
        """results_url when it is on the configured API origin (the api key is sent with it),
        else the documented path."""
        default = f"{BATCHES_PATH}/{bid}/results"
        url = info.results_url
        if not url:
            return default
        u, base = urlsplit(url), urlsplit(conn.base_url)
        if (u.scheme, u.netloc) != (base.scheme, base.netloc) or not u.path.startswith(base.path):
            log.info("results_url %s is not on %s; using %s", url, conn.base_url, default)
            return default
        path = u.path[len(base.path):]
        return path + (f"?{u.query}" if u.query else "")

    async def _job_call(self, conn: Conn, job: ProviderJob, method: str, path: str) -> dict:
        self._account(conn).claim(job.state["msgbatch_id"])
        try:
            return await self._api.request_json(conn, method, path)
        except ProviderError as e:
            if e.code == "provider_not_found":
                transient = Consistency.from_params(job.deployment.params).not_found_is_transient(
                    e, job.state.get("provider_created_at"), f"Anthropic message batch of {job.batch_id}")
                if transient is not None:
                    raise transient from e
                raise ProviderError(
                    f"Anthropic doesn't know message batch {job.state.get('msgbatch_id')} that batchgate "
                    f"created for {job.batch_id} at {conn.base_url} (404). It was deleted, or deployment "
                    f"{job.deployment.id!r} now points at another workspace (api_key or api_base changed). "
                    f"Detail: {e.message}", code="provider_job_not_found", retryable=False) from e
            raise

    async def _prepare(self, job: ProviderJob, *, write_body: bool) -> _Prepared:
        """Translate the input into the workdir files (see the module docstring). Deterministic:
        the same input always yields the same ids, body and error lines."""
        workdir = job.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        model = job.deployment.model
        max_tokens = _max_tokens(job.deployment)
        codec = anthropic_codec()
        files = {name: workdir / (name + ".tmp") for name in (IDS_FILE, ERRORS_FILE)
                 + ((BODY_FILE,) if write_body else ())}
        handles = {name: open(path, "wb") for name, path in files.items()}
        body = handles.get(BODY_FILE)
        sent = not_sent = 0
        size = 0
        try:
            if body is not None:
                size += body.write(b'{"requests":[')
            line_no = 0
            async for raw in job.open_input():
                line_no += 1
                if line_no % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                custom_id, params = _translated(raw, line_no, model=model, max_tokens=max_tokens)
                if isinstance(params, TranslationError):
                    not_sent += 1
                    handles[ERRORS_FILE].write(translation_error_line(
                        custom_id, params, request_index=line_no, batch_id=job.batch_id).data + b"\n")
                    continue
                pid = codec.encode(custom_id, line_no)
                entry = [pid, line_no] if pid == custom_id else [pid, line_no, custom_id]
                handles[IDS_FILE].write(json.dumps(entry).encode("ascii") + b"\n")
                if body is not None:
                    item = batch_request_line(pid, params)
                    size += body.write(b"," + item if sent else item)
                    if size + 2 > MAX_BODY_BYTES:
                        # A shard's line by its place in the input file, or by its custom_id where
                        # the shard's lines are not consecutive there (ProviderJob.first_line).
                        where = (f"input line {job.first_line + line_no - 1}" if job.first_line is not None
                                 else f"the request with custom_id {custom_id!r}")
                        raise ProviderError(
                            f"the batch is too large for Anthropic: its Message Batches create body exceeds "
                            f"{MAX_BODY_BYTES // 1_000_000} MB at {where} (Anthropic accepts at "
                            f"most 256 MB and {MAX_REQUESTS} requests per batch); split the input file",
                            code="batch_too_large", retryable=False)
                sent += 1
            if body is not None:
                size += body.write(b"]}")
            for fh in handles.values():
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            for fh in handles.values():
                fh.close()
            for path in files.values():
                path.unlink(missing_ok=True)
            raise
        for fh in handles.values():
            fh.close()
        for name, path in files.items():
            os.replace(path, workdir / name)
        return _Prepared(sent=sent, not_sent=not_sent, body_bytes=size)

    async def _load_index(self, job: ProviderJob) -> dict[str, _Entry]:
        ids_path = job.workdir / IDS_FILE
        if not ids_path.exists() or not (job.workdir / ERRORS_FILE).exists():
            log.warning("batch %s: translation records missing from %s; rebuilding them from the input",
                        job.batch_id, job.workdir)
            await self._prepare(job, write_body=False)
        index: dict[str, _Entry] = {}
        with open(ids_path, "rb") as fh:
            for raw in fh:
                entry = json.loads(raw)
                index[entry[0]] = _Entry(line_no=entry[1], original=entry[2] if len(entry) > 2 else entry[0])
        return index
