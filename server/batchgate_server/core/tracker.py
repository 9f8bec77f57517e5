"""The tracker owns every batch that has not ended.

One runner task per batch advances the state machine: submit to the provider,
poll it (one poll per batch however many watchers), collect the results into
batch_output files, and end the batch. Every change is persisted with its
revision bump in one transaction and then published to watchers. Only batches
this replica holds the lease on are run (core/ownership.py): at start its own and
any nobody holds, later those of replicas whose lease expired; every write is
fenced by the lease, and a runner whose lease is lost stops at once. Providers
keep what they need to resume in `job.state` (the executor its answers in the
store too, so that another replica resumes them).

A cancel accepted by another replica arrives as a stored CANCELLING state (a newer
revision): the runner takes it into its own record (_take_cancel) and carries it out.

Provider errors: a non-retryable one (401/403, 404 on our job, …) fails the batch
with its code; retryable ones (429/5xx/network) are retried with backoff honouring
Retry-After until they have lasted `give_up_after` seconds (litellm_params, default
6 h), then the batch fails. Every error counts toward the deployment's cooldown.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from batchgate_server.core.accounting import Accounting
from batchgate_server.core.events import BatchEvents, ParentsOnly
from batchgate_server.core.prepared_input import PreparedInputs
from batchgate_server.core.result_files import CollectedResults, collect_results
from batchgate_server.domain import log_context
from batchgate_server.core.ownership import Ownership, StoredProgress
from batchgate_server.domain.backoff import Backoff
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.ids import new_file_id
from batchgate_server.domain.models import (
    STATUS_TIMESTAMP,
    BatchError,
    BatchRecord,
    BatchStatus,
    FailureCount,
    RequestCounts,
)
from batchgate_server.core.routing import Router
from batchgate_server.core.shard_input import selection_lines
from batchgate_server.core.watch_hub import WatchHub
from batchgate_server.core.webhooks import Webhooks
from batchgate_server.providers.base import (
    BatchProvider,
    JobStatus,
    PollResult,
    ProviderError,
    ProviderJob,
    UnsupportedRequest,
    give_up_after,
)
from batchgate_server.providers.registry import ProviderRegistry
from batchgate_server.store.errors import (
    LeaseLost,
    RevisionConflict,
    StorageError,
    StorageFull,
    StorageUnavailable,
    is_full,
)
from batchgate_server.store.ports import BlobStore, MetadataStore

log = logging.getLogger(__name__)

ENDED_BY_POLL = {
    JobStatus.COMPLETED: BatchStatus.COMPLETED,
    JobStatus.EXPIRED: BatchStatus.EXPIRED,
    JobStatus.CANCELLED: BatchStatus.CANCELLED,
}


async def cancel_batch(tracker: Tracker, record: BatchRecord) -> BatchRecord:
    """Cancel the unfinished batch `record`: through its runner when this replica drives it, else
    stored as intent (CANCELLING with a new revision) for the replica that does (Tracker.changed)
    or will. Returns the batch as it then is (terminal if it ended meanwhile: the caller decides
    what that means). CancelBatch and a sharded parent's cancel of its shards both come here."""
    runner = tracker.runner(record.id)
    while not record.status.is_terminal:
        if runner is not None:
            try:
                return await runner.request_cancel()
            except LeaseLost:  # adopted elsewhere meanwhile: store the intent for its new owner
                runner = None
                record = await tracker.store.get_batch(record.id) or record
                continue
        if record.status is BatchStatus.CANCELLING:
            return record
        record.status = BatchStatus.CANCELLING
        record.cancelling_at = time.time()
        try:
            return await tracker.store.update_batch(record)
        except RevisionConflict:  # changed meanwhile: decide again
            record = await tracker.store.get_batch(record.id) or record
    return record


def batch_load(line_count: int) -> int:
    """What a batch counts for in its deployment's queue (Router.add_load)."""
    return line_count or 1


class Tracker:
    def __init__(self, store: MetadataStore, blobs: BlobStore, hub: WatchHub, router: Router,
                 providers: ProviderRegistry, accounting: Accounting, work_root: Path, ownership: Ownership, *,
                 min_poll_interval: float = 0.1, shared_progress: bool = False,
                 events: BatchEvents | None = None, webhooks: Webhooks | None = None) -> None:
        self.store = store
        self.ownership = ownership
        # Several replicas: the executor keeps its answers in the store too (see ProviderJob.progress).
        self.shared_progress = shared_progress
        self.events = ParentsOnly(events or BatchEvents())
        self.webhooks = webhooks  # the outbox rows of a batch's end go into its terminal transaction
        self.blobs = blobs
        self.hub = hub
        self.router = router
        self.providers = providers
        self.accounting = accounting
        self.work_root = work_root
        self.prepared = PreparedInputs(work_root)  # shards' inputs the split wrote (core/prepared_input.py)
        self.min_poll_interval = min_poll_interval
        self._runners: dict[str, BatchRunner] = {}
        self._parents: dict[str, str] = {}  # shard id -> its parent's id (a change wakes the parent)
        self._tasks: set[asyncio.Task] = set()
        self._writes: set[asyncio.Future] = set()  # BatchRunner._persist calls in flight
        self.stopping = False
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def replica(self) -> str:
        return self.ownership.replica

    async def start(self) -> int:
        self._unsubscribe = self.store.changes.subscribe(self.changed)
        await asyncio.to_thread(self.prepared.sweep)  # a split's copies from before are no one's now
        active = await self.ownership.start(self)
        for record in active:
            self.adopt(record)
        if active:
            log.info("resumed %d unfinished batch(es): %s", len(active), ", ".join(
                f"{r.id} ({r.status.value})" for r in active))
        return len(active)

    def adopt(self, record: BatchRecord, *, load_reserved: bool = False) -> None:
        """Drive `record` (this replica owns it) to its end. load_reserved: the caller already
        counted it with router.add_load (the runner removes it when the batch ends)."""
        if record.id in self._runners:
            return  # re-adopted after a late heartbeat: its runner still goes on
        if record.sharded:
            from batchgate_server.core.sharded import ShardedBatchRunner  # it builds on BatchRunner
            runner: BatchRunner = ShardedBatchRunner(self, record, load_reserved=load_reserved)
        else:
            runner = BatchRunner(self, record, load_reserved=load_reserved)
        if record.parent_id:
            self._parents[record.id] = record.parent_id
        self._runners[record.id] = runner
        context = contextvars.copy_context()  # the runner's own: what the hook sets stays there
        context.run(self.events.adopted, record)
        task = runner.task = asyncio.create_task(runner.run(), name=f"batch-{record.id}", context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what ownership asks (core/ownership.py Driver) -----------------------------------

    def running(self) -> dict[str, int]:
        return {i: r.rec.revision for i, r in self._runners.items() if not r.rec.status.is_terminal}

    def lost(self, batch_id: str) -> None:
        runner = self._runners.get(batch_id)
        if runner is not None:
            runner.lose()

    def changed(self, batch_id: str, revision: int) -> None:
        """Someone committed `revision` of `batch_id`: if that is newer than its runner's, another
        replica wrote it (a cancel)."""
        parent = self._runners.get(self._parents.get(batch_id, ""))
        if parent is not None:
            parent.shard_changed()
        runner = self._runners.get(batch_id)
        if runner is not None and revision > runner.rec.revision and not self.stopping:
            task = asyncio.create_task(runner.refresh(), name=f"refresh-{batch_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def runner(self, batch_id: str) -> "BatchRunner | None":
        return self._runners.get(batch_id)

    def batch_reading(self, file_id: str) -> str | None:
        """The id of an unfinished batch whose input is `file_id` (a shard's parent: shards are
        internal). A runner stays here a moment after its batch has ended (its last steps, a
        parent's merge after its shards' ends): an ended batch reads nothing any more."""
        for runner in self._runners.values():
            rec = runner.rec
            if rec.input_file_id == file_id and not rec.status.is_terminal:
                return rec.parent_id or rec.id
        return None

    async def stop(self) -> None:
        """Stop driving batches (they resume on the next start); nothing is cancelled at providers.
        The leases are kept: the caller releases them (Ownership.stop) once the providers have
        stopped their work too."""
        self.stopping = True
        await self.ownership.stop(release=False)  # no adoption, no heartbeat from here on
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        # A cancelled runner's shielded write goes on: it lands before the store is closed.
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()

    def follow_shard(self, shard_id: str, parent_id: str) -> None:
        """Changes of `shard_id` wake its parent's runner (wherever the shard runs)."""
        self._parents[shard_id] = parent_id

    def _forget(self, batch_id: str) -> None:
        runner = self._runners.pop(batch_id, None)
        if runner is not None:
            self.events.released(runner.rec)
            # shard -> parent entries go with the parent's runner, or with the shard's own when
            # its parent is not driven here.
            for shard in runner.rec.shards:
                self._parents.pop(shard.id, None)
            if runner.rec.parent_id not in self._runners:
                self._parents.pop(batch_id, None)

    def last_polls(self) -> list[tuple[BatchRecord, float | None]]:
        """Every owned batch that polls a provider (a sharded parent does not: its shards do) with
        the monotonic time of its last poll (None: not polled yet)."""
        return [(r.rec, r.last_poll) for r in self._runners.values() if not r.rec.sharded]


class BatchRunner:
    def __init__(self, tracker: Tracker, record: BatchRecord, *, load_reserved: bool = False) -> None:
        self.t = tracker
        self.rec = record
        self._load_reserved = load_reserved
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._cancel_sent = False
        self.deployment = tracker.router.deployment(record.deployment_id)
        self.job: ProviderJob | None = None
        self._provider: BatchProvider | None = None
        self.last_poll: float | None = None  # time.monotonic() of the last provider poll
        self.task: asyncio.Task | None = None
        self._lost = False  # another replica owns the batch now

    # -- persistence --------------------------------------------------------------------

    async def _persist(self, mutate: Callable[[BatchRecord], None], extra_files=(), ledger=None,
                       shards: Sequence[BatchRecord] = ()) -> BatchRecord:
        """Apply `mutate` and store the record; returns a copy of it as stored (by the time the
        caller resumes, self.rec may already carry the run loop's next write, not yet stored)."""
        # Shielded: aiosqlite finishes a statement it has queued even when the awaiting task is
        # cancelled (a CancelBatch deadline, shutdown), so a cancel here must not leave memory
        # and database disagreeing about the revision. The write, the in-memory record and the
        # publish complete together; the cancellation is delivered afterwards (Tracker.stop
        # waits for the write).
        if self.t.stopping:
            # No new write while stop() waits for the last ones: the batch resumes from its
            # stored state at the next start, as after a crash.
            raise asyncio.CancelledError("the tracker is stopping")
        write = asyncio.ensure_future(self._persist_now(mutate, extra_files, ledger, shards))
        self.t._writes.add(write)
        write.add_done_callback(self.t._writes.discard)
        # Retrieved here too: the awaiting runner may be gone (cancelled) when it fails.
        write.add_done_callback(lambda w: w.cancelled() or w.exception())
        return await asyncio.shield(write)

    async def _persist_now(self, mutate: Callable[[BatchRecord], None], extra_files, ledger,
                           shards: Sequence[BatchRecord]) -> BatchRecord:
        """shards: a sharded parent's split (core/sharded.py), inserted in the same transaction."""
        async with self._lock:
            for rebased in (False, True):
                before = copy.deepcopy(self.rec)
                before.provider_state = self.rec.provider_state  # the provider's own dict (job.state)
                mutate(self.rec)
                if rebased and before.status is BatchStatus.CANCELLING and not self.rec.status.is_terminal:
                    self.rec.status = BatchStatus.CANCELLING  # the cancel taken in stands until the end
                try:
                    outbox = (await self.t.webhooks.events_on_end(before.status, self.rec)
                              if self.t.webhooks else [])
                    if shards:
                        await self.t.store.split_batch(self.rec, shards, owner=self.t.replica)
                    else:
                        await self.t.store.update_batch(self.rec, extra_files=extra_files, ledger=ledger,
                                                        outbox=outbox, owner=self.t.replica)
                except RevisionConflict:
                    self.rec = before
                    stored = None if rebased else await self.t.store.get_batch(self.rec.id)
                    if stored is None or stored.revision <= self.rec.revision:
                        raise
                    self._take_cancel(stored)  # another replica's cancel: redo this change on top
                    continue
                except BaseException:
                    self.rec = before
                    raise
                stored = copy.deepcopy(self.rec)
                self.t.hub.publish(stored)
                if before.status is not self.rec.status:
                    log.info("batch %s: %s -> %s", self.rec.id, before.status.value, self.rec.status.value)
                self.t.events.changed(before, self.rec, ledger)
                if outbox:
                    self.t.webhooks.wake()
                return stored

    def _take_cancel(self, stored: BatchRecord) -> None:
        """Take in what another replica may write of an owned batch (its revision, and a cancel
        accepted there); the rest of the record is this runner's own."""
        self.rec.revision = stored.revision
        if stored.status is BatchStatus.CANCELLING and not self.rec.status.is_terminal:
            self.rec.status = BatchStatus.CANCELLING
            self.rec.cancelling_at = stored.cancelling_at
            if self.job is not None:
                self.job.cancel_requested.set()
            self._wake.set()

    async def refresh(self) -> None:
        """The stored batch is newer than this runner's record: take in the cancel."""
        async with self._lock:
            try:
                stored = await self.t.store.get_batch(self.rec.id)
            except StorageError as err:
                log.warning("batch %s: could not read a change made elsewhere: %s", self.rec.id, err)
                return  # the next heartbeat tells again
            if stored is not None and stored.revision > self.rec.revision:
                self._take_cancel(stored)

    def shard_changed(self) -> None:
        """One of this batch's shards changed (a sharded parent follows them, core/sharded.py)."""
        self._wake.set()

    def lose(self) -> None:
        """Another replica owns the batch now: stop at once, write nothing more."""
        self._lost = True
        if self.task is not None:
            self.task.cancel()

    async def _save_state(self) -> None:
        await self._persist(lambda r: None)

    def _enter(self, status: BatchStatus) -> Callable[[BatchRecord], None]:
        now = time.time()

        def mutate(r: BatchRecord) -> None:
            r.status = status
            stamp = STATUS_TIMESTAMP.get(status)
            if stamp and getattr(r, stamp) is None:
                setattr(r, stamp, now)
            if status is BatchStatus.IN_PROGRESS and r.request_counts.total == 0:
                r.request_counts = RequestCounts(total=self._line_count())

        return mutate

    def _line_count(self) -> int:
        return self.rec.input_line_count

    # -- cancel -------------------------------------------------------------------------

    async def request_cancel(self) -> BatchRecord:
        """Called by CancelBatch: record the intent now, the run loop carries it out. Returns the
        batch as stored: the run loop may have begun its next write before this resumes, and that
        revision is not stored yet (a read right after the answer would not find it)."""
        if self.rec.status not in (BatchStatus.CANCELLING,) and not self.rec.status.is_terminal:
            stored = await self._persist(self._enter(BatchStatus.CANCELLING))
        else:
            async with self._lock:  # no write in flight: self.rec is the stored state
                stored = copy.deepcopy(self.rec)
        if self.job is not None:
            self.job.cancel_requested.set()
        self._wake.set()
        return stored

    # -- the run loop ---------------------------------------------------------------------

    async def run(self) -> None:
        rec = self.rec
        # This task's log lines name the batch (contextvars are per task).
        log_context.bind(batch_id=rec.id, project=rec.project, deployment=rec.deployment_id,
                         file_id=rec.input_file_id)
        load = batch_load(rec.input_line_count)
        if not self._load_reserved and self.deployment is not None:
            self.t.router.add_load(self.deployment.id, load)
        try:
            if self.deployment is None:
                self._answers_left_here()
                await self._fail("deployment_not_found",
                                 f"deployment {rec.deployment_id!r} is no longer in the model list")
                return
            provider = self._provider = self.t.providers.get(self.deployment.provider)
            self.job = self._make_job()
            if rec.status is BatchStatus.CANCELLING:
                self.job.cancel_requested.set()
            backoff = Backoff(base=1.0, cap=120.0)
            # Our own storage comes back when an operator frees space: look again every few seconds.
            storage_backoff = Backoff(base=0.5, cap=5.0)
            give_up_after = self._give_up_after()
            failing_since: float | None = None  # start of the current run of retryable errors
            while not self.rec.status.is_terminal:
                try:
                    await self._step(provider)
                    backoff.reset()
                    storage_backoff.reset()
                    failing_since = None
                except ProviderError as err:
                    self.t.router.record_failure(self.deployment.id)
                    if not err.retryable:
                        await self._fail(err.code, err.message)
                        break
                    now = time.monotonic()
                    failing_since = now if failing_since is None else failing_since
                    if now - failing_since >= give_up_after:
                        await self._fail(err.code, f"{err.message}; batchgate retried for "
                                                   f"{now - failing_since:.0f}s and gave up")
                        break
                    delay = min(backoff.next(err.retry_after),
                                max(0.0, failing_since + give_up_after - now) + 0.01)
                    log.warning("batch %s: %s (retrying in %.1fs)", rec.id, err.message, delay)
                    await self._sleep(delay)
                except UnsupportedRequest as err:
                    await self._fail_with([BatchError(err.reason.lower(), err.message), *err.line_errors])
                    break
                except (StorageFull, StorageUnavailable, RevisionConflict, OSError) as err:
                    # Our own storage failing (a full disk, a database locked by a backup, a stale
                    # revision; OSError: a provider's work files): transient from the batch's point
                    # of view. Back off and retry from the stored record; never fail the batch and
                    # lose its results for it.
                    full = isinstance(err, StorageFull) or (isinstance(err, OSError) and is_full(err))
                    log.warning("batch %s: storage %s (%s: %s), retrying", rec.id, "full" if full else "error",
                                type(err).__name__, err)
                    try:
                        stored = await self.t.store.get_batch(rec.id)
                    except StorageError:
                        stored = None  # unreadable for now too: the next attempt reads it again
                    if stored is not None and stored.revision != self.rec.revision:
                        self.rec = stored
                        self.job.state = stored.provider_state
                        if stored.status is BatchStatus.CANCELLING:
                            self.job.cancel_requested.set()
                    await self._sleep(storage_backoff.next())
        except LeaseLost:
            log.warning("batch %s: lease lost; another replica drives it now", rec.id)
            await self._detach()
        except asyncio.CancelledError:
            if self._lost:
                await self._detach()
            raise
        except Exception as err:  # a bug must not leave the batch hanging forever
            log.exception("batch %s: unexpected error", rec.id)
            try:
                # The work directory is kept: it may hold answers the upstream already billed.
                await self._fail("internal_error", f"batchgate failed to run this batch: {type(err).__name__}",
                                 keep_workdir=True)
            except Exception:
                log.exception("batch %s: could not record the failure", rec.id)
        finally:
            if self.deployment is not None:
                self.t.router.remove_load(self.deployment.id, load)
            self.t._forget(rec.id)

    async def _detach(self) -> None:
        """Stop this process's share of the job (the executor's requests), leaving the job as the
        new owner will find it."""
        if self._provider is not None and self.job is not None:
            try:
                await self._provider.detach(self.job)
            except Exception:  # noqa: BLE001 - nothing of it is written anywhere
                log.exception("batch %s: could not stop its local work", self.rec.id)

    def _give_up_after(self) -> float:
        """Seconds of nothing but retryable provider errors (429/5xx/network) before the batch
        fails (the job may still run at the provider; its results would be lost to us anyway)."""
        return give_up_after(self.deployment)

    def _answers_left_here(self) -> None:
        """The batch's deployment left the model list: a provider that keeps the answers of its
        jobs here (the executor's work directory) still gives them, with a stand-in deployment, so
        that the failed batch is charged for them. A remote job can't be reached without its
        deployment's credentials: nothing is fetched (or charged) for it."""
        rec = self.rec
        if rec.in_progress_at is None:
            return
        try:
            provider = self.t.providers.get(rec.provider)
        except UnsupportedRequest:
            return
        if not provider.keeps_results_locally:
            return
        self._provider = provider
        self.job = self._make_job(Deployment(id=rec.deployment_id, model_name=rec.model, provider=rec.provider,
                                             model=str((rec.price or {}).get("model") or rec.model)))

    def _make_job(self, deployment: Deployment | None = None) -> ProviderJob:
        rec = self.rec
        job = ProviderJob(
            batch_id=rec.id, endpoint=rec.endpoint, deployment=deployment or self.deployment,
            line_count=self._line_count(),
            created_at=rec.created_at, expires_at=rec.expires_at, state=rec.provider_state,
            open_input=self._open_input, save_state=self._save_state,
            workdir=self.t.work_root / rec.id,
            progress=StoredProgress(self.t.store, rec.id, self.t.replica) if self.t.shared_progress else None,
            new_usage=lambda: self.t.accounting.usage_counter(rec), first_line=self._first_line())
        return job

    def _first_line(self) -> int | None:
        """ProviderJob.first_line: a shard's lines follow one another in the file only when it has one group."""
        selection = self.rec.selection
        if selection is None:
            return 1
        return selection.start + 1 if selection.single_group else None

    def _open_input(self):
        rec = self.rec
        if rec.selection is not None:  # a shard: its lines of the parent's input
            return selection_lines(self.t.blobs, rec.input_file_id, rec.selection)
        return self.t.blobs.lines(rec.input_file_id)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _wait_for_change(self, provider: BatchProvider) -> None:
        interval = float(self.deployment.params.get("poll_interval", provider.poll_interval))
        waiter = asyncio.create_task(provider.wait_for_change(self.job, interval))
        woken = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            woken.cancel()
        self._wake.clear()
        # Coalesce bursts of progress into at most one revision per min_poll_interval.
        await provider.coalesce(self.job, self.t.min_poll_interval)

    async def _step(self, provider: BatchProvider) -> None:
        job = self.job
        status = self.rec.status
        submitted = self.rec.in_progress_at is not None
        if status is BatchStatus.CANCELLING and not submitted:
            await self._cancel_before_submission()
            return
        if status is BatchStatus.VALIDATING:
            # A shard: the input its split wrote, when kept here; asked again at every attempt, as a
            # read of it that failed drops it (the attempt after builds the input from the file).
            job.open_prepared = self.t.prepared.opener(self.rec.id, job.deployment)
            await provider.submit(job)
            self.t.prepared.release(self.rec.id)  # the provider has the input: a shard's prepared copy goes

            def started(r: BatchRecord) -> None:
                was = r.status
                self._enter(BatchStatus.IN_PROGRESS)(r)  # stamps in_progress_at and the total
                if was is BatchStatus.CANCELLING:
                    # A cancel arrived while submitting: keep it. in_progress_at records that
                    # the provider has the job, so the cancel is sent there.
                    r.status = was

            await self._persist(started)
            self.t.router.record_success(self.deployment.id)
            return
        if status is BatchStatus.CANCELLING and not self._cancel_sent:
            await provider.cancel(job)
            self._cancel_sent = True
        poll = await provider.poll(job)
        self.last_poll = time.monotonic()
        self.t.events.polled(self.rec)
        await self._apply_poll(poll, provider)
        if not self.rec.status.is_terminal:
            await self._wait_for_change(provider)

    async def _apply_poll(self, poll: PollResult, provider: BatchProvider) -> None:
        rec = self.rec
        counts = poll.request_counts
        if counts is not None and counts.total == 0:
            counts = RequestCounts(rec.request_counts.total, counts.completed, counts.failed)
        counts_changed = counts is not None and counts != rec.request_counts
        failures_changed = poll.failures is not None and poll.failures != rec.failures
        ended = ENDED_BY_POLL.get(poll.status)
        if ended is BatchStatus.COMPLETED and rec.status is BatchStatus.CANCELLING:
            # The caller was told the batch is cancelling: it ends cancelled, results kept,
            # even when the provider finished every request before the cancel landed.
            ended = BatchStatus.CANCELLED
        if ended is not None:
            await self._finish(provider, ended, poll.failures)
            return
        if poll.status is JobStatus.FAILED:
            await self._fail_with(poll.errors or [BatchError("provider_failed", poll.detail or
                                                             "the provider reported the batch as failed")])
            return
        target = None
        if poll.status is JobStatus.FINALIZING and rec.status is BatchStatus.IN_PROGRESS:
            target = BatchStatus.FINALIZING
        elif poll.status is JobStatus.CANCELLING and rec.status is not BatchStatus.CANCELLING:
            target = BatchStatus.CANCELLING
        if target is None and not counts_changed and not failures_changed:
            return

        def mutate(r: BatchRecord) -> None:
            if counts_changed:
                r.request_counts = counts
            if failures_changed:
                r.failures = poll.failures
            if target is not None:
                self._enter(target)(r)

        await self._persist(mutate)

    # -- ending ---------------------------------------------------------------------------

    async def _cancel_before_submission(self) -> None:
        """Cancelled while validating: nothing reached the provider, nothing ran, nothing to charge."""
        def mutate(r: BatchRecord) -> None:
            self._enter(BatchStatus.CANCELLED)(r)
            r.request_counts = RequestCounts(total=self._line_count())
            r.usage = None
            r.cost = self.t.accounting.nothing_to_charge(r)

        await self._persist(mutate, ledger=self.t.accounting.ledger_row(self.rec, None))
        await self._cleanup()

    async def _fail(self, code: str, message: str, keep_workdir: bool = False) -> None:
        await self._fail_with([BatchError(code, message)], keep_workdir=keep_workdir)

    async def _fail_with(self, errors: list[BatchError], keep_workdir: bool = False) -> None:
        errors = list(errors)
        collected = await self._partial_results(errors)

        usage = collected.usage.by_tier if collected is not None else None
        usage_total, cost = (self.t.accounting.price(self.rec, usage) if usage is not None
                             else (None, self.t.accounting.nothing_to_charge(self.rec)))

        def mutate(r: BatchRecord) -> None:
            self._enter(BatchStatus.FAILED)(r)
            r.errors = errors
            if collected is not None:  # partial results: kept, and charged as the provider bills them
                collected.record_on(r, r.request_counts.total or self._line_count())
                r.usage = usage_total
            r.cost = cost

        ledger = self.t.accounting.ledger_row(self.rec, usage, cost=cost)
        log.warning("batch %s failed: %s", self.rec.id, errors[0].message if errors else "")
        await self._persist_results(mutate, collected, ledger)
        if keep_workdir:
            log.warning("batch %s: work files kept in %s", self.rec.id, self.t.work_root / self.rec.id)
        else:
            await self._cleanup()

    async def _partial_results(self, errors: list[BatchError]) -> CollectedResults | None:
        """A failing batch the provider has run: the answers it has (the provider bills them), or
        None when there are none (when they could not be fetched, the last error says so)."""
        if self.job is None or self._provider is None or self.rec.in_progress_at is None:
            return None  # never submitted: nothing ran, nothing to charge
        try:
            await self._choose_result_ids()
            collected = await collect_results(self._provider.results(self.job), self.t.blobs, self.rec,
                                              self.t.accounting.usage_counter(self.rec), time.time())
        except Exception as err:  # noqa: BLE001 - the batch still ends failed, charged nothing
            log.warning("batch %s: the results of the failed job could not be fetched: %s", self.rec.id, err)
            # Said on the failure itself (its code stays what callers match on).
            last = errors[-1] if errors else BatchError("provider_failed", "the batch failed")
            errors[-1:] = [BatchError(last.code, f"{last.message}; the answers the provider may have could not be "
                                      f"fetched ({_describe(err)}): nothing was charged", last.param, last.line)]
            return None
        if not collected.out_lines:  # nothing answered, nothing billed: it fails as if nothing ran
            await collected.discard(self.t.blobs)
            return None
        return collected

    async def _choose_result_ids(self, finalizing: bool = False) -> None:
        """Name the result files once, before any is written, so a collection redone after a crash
        writes the same files; finalizing: the batch shows FINALIZING while they are written."""
        if self.rec.result_file_ids and (not finalizing or self.rec.status is BatchStatus.FINALIZING):
            return

        def prepare(r: BatchRecord) -> None:
            if not r.result_file_ids:
                r.result_file_ids = [new_file_id(), new_file_id()]
            if finalizing:
                self._enter(BatchStatus.FINALIZING)(r)

        await self._persist(prepare)

    async def _persist_results(self, mutate: Callable[[BatchRecord], None], collected: CollectedResults | None,
                               ledger: dict) -> None:
        """The terminal write, with the result files when there are any."""
        try:
            await self._persist(mutate, extra_files=collected.files if collected else (), ledger=ledger)
        except asyncio.CancelledError:
            # The shielded write may still land: keep the blobs (unrecorded ones are removed as
            # orphans at the next start, and a redone finalisation rewrites the same ids).
            raise
        except BaseException:
            if collected is not None:  # not recorded: a retry writes them again under the same ids
                await collected.discard(self.t.blobs)
            raise

    async def _finish(self, provider: BatchProvider, status: BatchStatus,
                      failures: list[FailureCount] | None = None) -> None:
        await self._choose_result_ids(finalizing=status is BatchStatus.COMPLETED)
        # Counted as the lines were written (the executor), or summed from them here.
        counted = provider.counted_usage(self.job)
        collected = await collect_results(provider.results(self.job), self.t.blobs, self.rec,
                                          self.t.accounting.usage_counter(self.rec) if counted is None else None,
                                          time.time())
        if counted is not None:
            collected.usage = counted
        usage_total, cost = self.t.accounting.price(self.rec, collected.usage.by_tier)

        def mutate(r: BatchRecord) -> None:
            # A cancel accepted while results were being collected still ends the batch cancelled.
            ended = BatchStatus.CANCELLED if (status is BatchStatus.COMPLETED
                                              and r.status is BatchStatus.CANCELLING) else status
            self._enter(ended)(r)
            collected.record_on(r, r.request_counts.total or self._line_count())
            r.usage = usage_total
            r.cost = cost
            if failures is not None:
                r.failures = failures

        await self._persist_results(mutate, collected, self.t.accounting.ledger_row(
            self.rec, collected.usage.by_tier, cost=cost))
        log.info("batch %s %s: %d ok, %d failed", self.rec.id, self.rec.status.value, collected.out_lines,
                 collected.err_lines)
        await self._cleanup()

    async def _cleanup(self) -> None:
        """The batch has ended and its results are stored: the provider deletes what the job left
        with it, then the work directory goes."""
        if self.job is None:
            return
        if self._provider is not None:
            try:
                await self._provider.release(self.job)
            except Exception as err:  # noqa: BLE001 - best effort: the provider's retention sweep tidies up
                log.warning("batch %s: could not release what it left at the provider: %s", self.rec.id, err)
        shutil.rmtree(self.job.workdir, ignore_errors=True)


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
