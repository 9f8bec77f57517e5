"""One executor run: send every unanswered request of a batch, write each result as it arrives."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from batchgate_server.domain.backoff import jittered_delay
from batchgate_server.domain.deployment import Deployment
from batchgate_server.providers.base import DEFAULT_GIVE_UP_AFTER, ProviderJob, RequestEvents
from batchgate_server.providers.executor.failures import FailureTally, failure_of
from batchgate_server.providers.executor.health import UpstreamHealth
from batchgate_server.providers.executor.progress import Flushed, ProgressFlusher
from batchgate_server.providers.executor.rate_limit import RateLimiter
from batchgate_server.providers.executor.results_log import ResultsLog
from batchgate_server.providers.executor.transport import TransportFailure, TransportResponse, cancel_until_done

log = logging.getLogger(__name__)

_msgspec_decode = msgspec.json.Decoder().decode
_msgspec_encode = msgspec.json.Encoder().encode

MAX_RETRY_AFTER = 600.0
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}
# The error line of a request still unanswered when a run ends, by how it ended.
UNSENT_ERROR = {
    "completed": {"code": "internal_error", "message": "batchgate lost this request before answering it"},
    "expired": {"code": "batch_expired", "message": "the batch's completion window ended before this request ran"},
    "cancelled": {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"},
}


@dataclass
class ExecutorOptions:
    max_concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 120.0  # per request
    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # Caps the completion window (seconds from creation); None: the batch's own window.
    completion_window: float | None = None
    rewrite_model: str | None = None
    # Seconds of upstream outage after which its waiting requests fail (litellm_params.give_up_after).
    give_up_after: float = DEFAULT_GIVE_UP_AFTER


def upstream_health(deployment: Deployment, options: ExecutorOptions) -> UpstreamHealth:
    """The outage and failure-streak tracker for `deployment` (one per deployment, shared by its batches)."""
    return UpstreamHealth(deployment.model_name, backoff_base=options.backoff_base, backoff_cap=options.backoff_cap,
                          secrets=[deployment.params.get("api_key") or ""])


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _line_id(batch_id: str, custom_id: str) -> str:
    # surrogatepass: a JSON-escaped lone surrogate ("\ud800") is a valid custom_id but not UTF-8.
    return "batch_req_" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _estimate_tokens(body: dict, raw_len: int) -> int:
    out = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    # Only a plain number counts: a malformed value is the upstream's to reject, not a crash here.
    return raw_len // 4 + (out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else 256)


def _decode(raw: bytes) -> tuple[Any, bool]:
    """(value, exact). msgspec decodes several times faster than json, which matters once per
    request and once per answer; what msgspec refuses and Python's json accepts (a lone surrogate
    escape, NaN or Infinity, 1e400) is decoded by json, and exact=False says that value must be
    encoded by json too (msgspec would write a non-finite float as null). Raises ValueError."""
    try:
        return _msgspec_decode(raw), True
    except msgspec.DecodeError:
        return json.loads(raw), False


def _encode_text(text: str) -> bytes:
    """A JSON string; json for what UTF-8 cannot hold (a lone surrogate)."""
    try:
        return _msgspec_encode(text)
    except UnicodeEncodeError:
        return json.dumps(text).encode()


def _json_or_none(raw: bytes):
    try:
        return _decode(raw)[0]
    except ValueError:
        return None


def _request(raw: bytes, number: int) -> tuple[dict, bool]:
    """Input line `number` (validated at upload) and whether msgspec may encode it (see _decode).
    A line without a custom_id could not be answered, so it stops the run instead."""
    try:
        line, exact = _decode(raw)
    except ValueError:
        line, exact = None, False
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        raise ValueError(f"input line {number} has no custom_id")
    return line, exact


def _usage_tokens(parsed: dict) -> int | None:
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    return int(total) if isinstance(total, int) else None


@dataclass
class _Failure:
    """One failed attempt: its code and message, the error line it becomes if the request ends
    here (response or error), and whether trying again can help."""

    code: str
    message: str
    response: dict | None
    error: dict | None
    upstream_fault: bool  # says nothing about the request: no answer, 5xx, 429, a timeout
    retryable: bool
    retry_after: float | None = None


def _failure_of_answer(resp: TransportResponse, parsed) -> _Failure:
    """An answer that is not a success: an HTTP error, or a 2xx whose body is not JSON."""
    upstream_fault = resp.status in RETRYABLE_STATUS
    retryable = upstream_fault or 200 <= resp.status < 300
    retry_after = retry_after_seconds(resp.headers.get("retry-after")) if retryable else None
    if parsed is None:
        message = f"the server answered HTTP {resp.status} with a body that is not JSON"
        return _Failure("invalid_response", message, None, {"code": "invalid_response", "message": message},
                        upstream_fault, retryable, retry_after)
    response = {"status_code": resp.status, "request_id": resp.headers.get("x-request-id", ""), "body": parsed}
    code, message = failure_of({"response": response})
    return _Failure(code, message, response, None, upstream_fault, retryable, retry_after)


class ExecutorRun:
    def __init__(self, job: ProviderJob, transport, options: ExecutorOptions,
                 limiter: RateLimiter | None = None, health: UpstreamHealth | None = None,
                 flushed: Flushed | None = None, *, events: RequestEvents | None = None) -> None:
        self.job = job
        self.events = events or RequestEvents()
        self.transport = transport
        self.options = options
        # Shared by every batch on the deployment: the limits and the outages are the upstream's.
        self.limiter = limiter or RateLimiter(options.rpm, options.tpm)
        self.health = health or upstream_health(job.deployment, options)
        self.failures = FailureTally(self.health.secrets)
        self.log = ResultsLog(job.workdir, on_error_line=lambda line: self.failures.answered(*failure_of(line)),
                              usage=job.new_usage() if job.new_usage is not None else None)
        # Several replicas: answers are stored for the one that may take the batch over.
        self.flusher = ProgressFlusher(job, flushed, lambda: self.log.ends) if flushed is not None else None
        self.changed = asyncio.Event()
        self.ended = asyncio.Event()  # the run has stopped (its outcome is saved, or it crashed)
        self.outcome: str | None = None  # completed | expired | cancelled, once finished
        deadline = job.expires_at
        if options.completion_window:
            deadline = min(deadline, job.created_at + options.completion_window)
        self.deadline = deadline
        # Cleared while the results log cannot be written (a full disk): nothing new is sent.
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task | None = None

    @property
    def completed(self) -> int:
        return self.log.completed

    @property
    def failed(self) -> int:
        return self.log.failed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"executor-{self.job.batch_id}")
        if self.flusher is not None:
            self.flusher.start()

    async def stop(self) -> None:
        if self.flusher is not None:
            await self.flusher.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.log.close()

    # -- the run --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            outcome = await self._send_all()
            await self._close_unanswered(outcome)
            if self.flusher is not None:
                # Every answer stored before the outcome: a replica taking over from here on
                # finalises from the stored answers alone.
                await self.flusher.stop()
                await self.flusher.flush()
            # Saved before it is reported: after a crash during finalisation the resumed run
            # finds every request answered and must not mistake an expired batch for a completed one.
            self.job.state["executor_outcome"] = outcome
            await self.job.save_state()
            self.outcome = outcome
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("executor run of %s crashed", self.job.batch_id)
            raise
        finally:
            self.ended.set()
            self.changed.set()

    async def _send_all(self) -> str:
        """Returns how sending ended: completed, expired or cancelled."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.options.max_concurrency * 2)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.options.max_concurrency)]
        producer = asyncio.create_task(self._produce(queue))
        stop_reasons = {
            asyncio.create_task(self.job.cancel_requested.wait()): "cancelled",
            asyncio.create_task(asyncio.sleep(max(0.0, self.deadline - time.time()))): "expired",
        }
        everything = asyncio.ensure_future(self._drain(producer, queue))
        try:
            done, _ = await asyncio.wait({everything, *stop_reasons}, return_when=asyncio.FIRST_COMPLETED)
            if everything in done:
                everything.result()
                return "completed"
            return next(reason for task, reason in stop_reasons.items() if task in done)
        finally:
            # Every task of the run ends with it, `everything` too when the run itself is cancelled
            # (a stop): a task left pending is destroyed with the loop and logged as an error.
            # cancel_until_done: a worker's cancel can be lost inside the HTTP client (transport.py).
            await cancel_until_done([everything, producer, *workers, *stop_reasons])

    async def _drain(self, producer: asyncio.Task, queue: asyncio.Queue) -> None:
        await producer
        await queue.join()

    async def _produce(self, queue: asyncio.Queue) -> None:
        done = self.log.done
        number = 0
        async for raw in self.job.open_input():
            number += 1
            request = _request(raw, number)
            if request[0]["custom_id"] not in done:
                await queue.put(request)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            line, exact = await queue.get()
            try:
                await self._execute(line, exact)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # One bad request must not take its worker down (its custom_id would go
                # unanswered, and enough of them would stall the whole batch).
                log.exception("batch %s: request %r failed in the executor", self.job.batch_id, line["custom_id"])
                try:
                    await self._write_error(line["custom_id"], None, {
                        "code": "invalid_request",
                        "message": f"batchgate could not send this request: {type(err).__name__}"})
                except Exception:  # left unanswered: _close_unanswered answers it before the run ends
                    log.exception("batch %s: no error line for request %r", self.job.batch_id, line["custom_id"])
            finally:
                queue.task_done()

    async def _execute(self, line: dict, exact: bool) -> None:
        custom_id = line["custom_id"]
        body = line["body"]
        if self.options.rewrite_model:
            body["model"] = self.options.rewrite_model
        payload = _msgspec_encode(body) if exact else json.dumps(body).encode()
        path = line["url"]
        estimate = _estimate_tokens(body, len(payload))
        health, events, deployment_id = self.health, self.events, self.job.deployment.id
        attempt = 0  # retries spent on failures of this request's own
        while True:
            probe = health.outage_since is not None and await health.admit(self.options.give_up_after)
            if not self._writable.is_set():
                await self._writable.wait()
            asked = time.monotonic()
            await self.limiter.acquire(estimate)
            if (waited := time.monotonic() - asked) > 0.001:
                events.rate_limited(deployment_id, waited)
            events.sent(deployment_id)
            try:
                resp = await self.transport.send(path, payload, custom_id)
            except asyncio.CancelledError:  # the batch stopped (cancelled, handed over) mid-request
                events.answered(deployment_id, "cancelled")
                raise
            except TransportFailure as err:
                failure = _Failure(err.code, err.message, None, {"code": err.code, "message": err.message},
                                   upstream_fault=err.upstream_fault, retryable=True)
            else:
                parsed = _json_or_none(resp.body)
                if 200 <= resp.status < 300 and parsed is not None:
                    events.answered(deployment_id, "ok")
                    health.succeeded()
                    self.limiter.settle(estimate, _usage_tokens(parsed))
                    await self._write_output(custom_id, resp.status, resp.headers.get("x-request-id", ""),
                                             resp.body, parsed)
                    return
                failure = _failure_of_answer(resp, parsed)
            finally:
                if probe:
                    health.end_probe()
            events.answered(deployment_id, failure.code)
            self.limiter.settle(estimate, 0)
            out = health.failed(custom_id, failure.code, failure.message, upstream_fault=failure.upstream_fault,
                                probe=probe)
            if failure.retryable:
                retry_after = failure.retry_after
                if retry_after is not None:  # never past the batch's deadline (nor forever)
                    retry_after = min(retry_after, max(0.0, self.deadline - time.time()), MAX_RETRY_AFTER)
                    if failure.code in ("http_429", "http_503"):
                        self.limiter.pause(retry_after)  # the whole deployment backs off
                if out and health.outage_for() < self.options.give_up_after:
                    # Waiting for the deployment to come back costs this request none of its retries.
                    self.failures.retried(failure.code, failure.message)
                    events.retried(deployment_id, failure.code)
                    continue
                if not out and attempt < self.options.max_retries:
                    attempt += 1
                    self.failures.retried(failure.code, failure.message)
                    events.retried(deployment_id, failure.code)
                    await asyncio.sleep(self._backoff(attempt, retry_after))
                    continue
            await self._write_error(custom_id, failure.response, failure.error)
            return

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # `attempt` counts retries from 1 here; jittered_delay counts from 0.
        return jittered_delay(attempt - 1, self.options.backoff_base, self.options.backoff_cap, retry_after)

    # -- writing results --------------------------------------------------------------------

    async def _write_output(self, custom_id: str, status: int, request_id: str, raw: bytes, parsed) -> None:
        raw = raw.strip()
        if b"\n" in raw or b"\r" in raw:
            raw = json.dumps(parsed).encode()
        line = (b'{"id":"' + _line_id(self.job.batch_id, custom_id).encode() + b'","custom_id":'
                + _encode_text(custom_id) + b',"response":{"status_code":' + str(status).encode()
                + b',"request_id":' + _encode_text(request_id) + b',"body":' + raw + b'},"error":null}')
        # The usage is counted from `parsed` as the line is written: never parsed again.
        counted = {"response": {"status_code": status, "body": parsed}}
        await self._keep(self.log.write_output, custom_id, line, counted)

    async def _write_error(self, custom_id: str, response: dict | None, error: dict | None) -> None:
        record = {"id": _line_id(self.job.batch_id, custom_id), "custom_id": custom_id,
                  "response": response, "error": error}
        await self._keep(self.log.write_error, custom_id, json.dumps(record).encode())
        self.failures.answered(*failure_of(record))

    async def _keep(self, write, *args) -> None:
        """Write one result line (`write(*args)`: custom_id, the line, …); while the disk refuses
        it, hold it (and every new request) and try again, so a full disk pauses the run instead
        of losing answers."""
        try:
            write(*args)
        except OSError as err:
            await self._keep_when_writable(write, args, err)
        self.changed.set()

    async def _keep_when_writable(self, write, args: tuple, err: OSError) -> None:
        if self._writable.is_set():
            self._writable.clear()
            log.warning("batch %s: cannot write results to %s (%s); paused until it can",
                        self.job.batch_id, self.job.workdir, err)
        attempt = 0
        while True:
            await asyncio.sleep(jittered_delay(attempt, 0.25, 5.0))
            attempt += 1
            try:
                write(*args)
                break
            except OSError:
                pass
        if not self._writable.is_set():
            self._writable.set()
            log.warning("batch %s: results written again; resumed", self.job.batch_id)

    async def _close_unanswered(self, outcome: str) -> None:
        """Every request gets an answer before the run reports its outcome: an expired or
        cancelled run answers those it did not send with an error line; a completed run should
        have none left, but if a request was lost anyway it must show as an error, never vanish."""
        if outcome == "completed" and len(self.log.done) >= self.job.line_count:
            return  # every line answered (custom_ids are unique): no second pass over the input
        error = UNSENT_ERROR[outcome]
        number = 0
        async for raw in self.job.open_input():
            number += 1
            custom_id = _request(raw, number)[0]["custom_id"]
            if custom_id not in self.log.done:
                if outcome == "completed":
                    log.error("batch %s: request %r was never answered", self.job.batch_id, custom_id)
                await self._write_error(custom_id, None, error)
