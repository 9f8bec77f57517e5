"""One executor run: send every unanswered request of a batch, write each result as it arrives."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from batchgate_server.core.backoff import jittered_delay
from batchgate_server.providers.base import ProviderJob
from batchgate_server.providers.executor.rate_limit import RateLimiter
from batchgate_server.providers.executor.results_log import ResultsLog
from batchgate_server.providers.executor.transport import TransportFailure

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 600.0
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}


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
    return "batch_req_" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:24]


def _estimate_tokens(body: dict, raw_len: int) -> int:
    out = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    # Only a plain number counts: a malformed value is the upstream's to reject, not a crash here.
    return raw_len // 4 + (out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else 256)


def _usage_tokens(parsed: dict) -> int | None:
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    return int(total) if isinstance(total, int) else None


class ExecutorRun:
    def __init__(self, job: ProviderJob, transport, options: ExecutorOptions,
                 limiter: RateLimiter | None = None) -> None:
        self.job = job
        self.transport = transport
        self.options = options
        self.log = ResultsLog(job.workdir)
        # Shared by every batch on the deployment: the limits are the upstream's, not per batch.
        self.limiter = limiter or RateLimiter(options.rpm, options.tpm)
        self.changed = asyncio.Event()
        self.outcome: str | None = None  # completed | expired | cancelled, once finished
        deadline = job.expires_at
        if options.completion_window:
            deadline = min(deadline, job.created_at + options.completion_window)
        self.deadline = deadline
        self._task: asyncio.Task | None = None

    @property
    def completed(self) -> int:
        return self.log.completed

    @property
    def failed(self) -> int:
        return self.log.failed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"executor-{self.job.batch_id}")

    async def stop(self) -> None:
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
        try:
            everything = asyncio.ensure_future(self._drain(producer, queue))
            done, _ = await asyncio.wait({everything, *stop_reasons}, return_when=asyncio.FIRST_COMPLETED)
            if everything in done:
                everything.result()
                return "completed"
            everything.cancel()
            return next(reason for task, reason in stop_reasons.items() if task in done)
        finally:
            for task in (producer, *workers, *stop_reasons):
                task.cancel()
            await asyncio.gather(producer, *workers, *stop_reasons, return_exceptions=True)

    async def _drain(self, producer: asyncio.Task, queue: asyncio.Queue) -> None:
        await producer
        await queue.join()

    async def _produce(self, queue: asyncio.Queue) -> None:
        done = self.log.done
        async for raw in self.job.open_input():
            line = json.loads(raw)
            if line["custom_id"] in done:
                continue
            await queue.put(line)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            line = await queue.get()
            try:
                await self._execute(line)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # One bad request must not take its worker down (its custom_id would go
                # unanswered, and enough of them would stall the whole batch).
                log.exception("batch %s: request %r failed in the executor", self.job.batch_id, line.get("custom_id"))
                self._write_error(line["custom_id"], None, {
                    "code": "invalid_request", "message": f"batchgate could not send this request: {type(err).__name__}"})
            finally:
                queue.task_done()

    async def _execute(self, line: dict) -> None:
        custom_id = line["custom_id"]
        body = line["body"]
        if self.options.rewrite_model:
            body["model"] = self.options.rewrite_model
        payload = json.dumps(body).encode()
        path = line["url"]
        estimate = _estimate_tokens(body, len(payload))
        attempt = 0
        while True:
            await self.limiter.acquire(estimate)
            try:
                resp = await self.transport.send(path, payload, custom_id)
            except TransportFailure as failure:
                self.limiter.settle(estimate, 0)
                if attempt < self.options.max_retries:
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt, None))
                    continue
                self._write_error(custom_id, None, {"code": failure.code, "message": failure.message})
                return
            parsed = None
            try:
                parsed = json.loads(resp.body)
            except ValueError:
                pass
            retryable = resp.status in RETRYABLE_STATUS or (200 <= resp.status < 300 and parsed is None)
            if retryable and attempt < self.options.max_retries:
                attempt += 1
                self.limiter.settle(estimate, 0)
                retry_after = retry_after_seconds(resp.headers.get("retry-after"))
                if retry_after is not None:  # never past the batch's deadline (nor forever)
                    retry_after = min(retry_after, max(0.0, self.deadline - time.time()), MAX_RETRY_AFTER)
                    if resp.status in (429, 503):
                        self.limiter.pause(retry_after)  # the whole deployment backs off
                await asyncio.sleep(self._backoff(attempt, retry_after))
                continue
            self.limiter.settle(estimate, _usage_tokens(parsed))
            request_id = resp.headers.get("x-request-id", "")
            if parsed is None:
                self._write_error(custom_id, None, {
                    "code": "invalid_response",
                    "message": f"the server answered HTTP {resp.status} with a body that is not JSON"})
            elif 200 <= resp.status < 300:
                self._write_output(custom_id, resp.status, request_id, resp.body, parsed)
            else:
                self._write_error(custom_id, {"status_code": resp.status, "request_id": request_id,
                                              "body": parsed}, None)
            return

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # `attempt` counts retries from 1 here; jittered_delay counts from 0.
        return jittered_delay(attempt - 1, self.options.backoff_base, self.options.backoff_cap, retry_after)

    # -- writing results --------------------------------------------------------------------

    def _write_output(self, custom_id: str, status: int, request_id: str, raw: bytes, parsed) -> None:
        raw = raw.strip()
        if b"\n" in raw or b"\r" in raw:
            raw = json.dumps(parsed).encode()
        line = (b'{"id":"' + _line_id(self.job.batch_id, custom_id).encode() + b'","custom_id":'
                + json.dumps(custom_id).encode() + b',"response":{"status_code":' + str(status).encode()
                + b',"request_id":' + json.dumps(request_id).encode() + b',"body":' + raw + b'},"error":null}')
        self.log.write_output(custom_id, line)
        self.changed.set()

    def _write_error(self, custom_id: str, response: dict | None, error: dict | None) -> None:
        line = json.dumps({"id": _line_id(self.job.batch_id, custom_id), "custom_id": custom_id,
                           "response": response, "error": error}).encode()
        self.log.write_error(custom_id, line)
        self.changed.set()

    async def _close_unanswered(self, outcome: str) -> None:
        """An expired or cancelled run answers every request it did not send with an error line."""
        if outcome == "completed":
            return
        code = "batch_expired" if outcome == "expired" else "batch_cancelled"
        message = ("the batch's completion window ended before this request ran" if outcome == "expired"
                   else "the batch was cancelled before this request ran")
        async for raw in self.job.open_input():
            custom_id = json.loads(raw)["custom_id"]
            if custom_id not in self.log.done:
                self._write_error(custom_id, None, {"code": code, "message": message})
