"""A sharded batch's own runner: split, follow the shards, propagate a cancel, merge.

The parent (BatchRecord.plan set, domain/shards.py) runs no provider job itself. Its runner
1. splits (VALIDATING): one pass over the input measures every line as its provider receives it
   (BatchProvider.request_size, in a thread: measure_parts) and cuts each planned part into the fewest near-equal jobs under
   the provider's JobLimits; then ONE store transaction inserts every shard and moves the parent
   to in_progress (split_batch). A split redone after a crash cuts the same shards. Until the
   shards are adopted the parent holds their load in the router (Router.add_load), as a single
   job holds its own, so a create close behind it routes around it.
2. follows (IN_PROGRESS / CANCELLING): the shards run as ordinary batches (BatchRunner, any
   replica); a shard's change wakes this runner (Tracker.changed) and it re-reads their rows every
   FOLLOW_INTERVAL too (a notification may be lost, a shard may run elsewhere). It persists the
   aggregate (Batch.shards, request_counts) only when something changed.
3. merges (all shards ended): the shards' output files into one output file and their error files
   into one error file, under ids chosen once (as BatchRunner._finish), adding an error line for
   every request of a shard that has no line for it, so every custom_id is answered exactly once.
   Usage and cost are the shards' sums; the ledger rows are the shards' own (the parent writes
   none), and the shards' result files are deleted once the parent's end has committed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise

import msgspec

from batchgate_server.core.prepared_input import PartWriter, PreparedRange
from batchgate_server.core.result_files import collect_results
from batchgate_server.core.shard_input import line_group, selection_lines
from batchgate_server.core.tracker import BatchRunner, Tracker, batch_load, cancel_batch
from batchgate_server.domain import log_context
from batchgate_server.domain.backoff import Backoff
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.ids import new_file_id
from batchgate_server.domain.models import (
    BatchError,
    BatchRecord,
    BatchStatus,
    RequestCounts,
    ShardSummary,
    Usage,
)
from batchgate_server.domain.shards import JobLimits, PlannedPart, ShardSelection
from batchgate_server.pricing.cost import sum_costs
from batchgate_server.providers.base import BatchProvider, ResultKind, ResultLine
from batchgate_server.providers.output_lines import line_id, no_result_line
from batchgate_server.store.errors import LeaseLost, RevisionConflict, StorageError, StorageFull, StorageUnavailable
from batchgate_server.store.ports import BlobStore, request_lines_at

log = logging.getLogger(__name__)

# Seconds between re-reads of the shards' rows when no change notification came.
FOLLOW_INTERVAL = 2.0
# Errors of failed shards a failed parent shows.
MAX_PARENT_ERRORS = 10


class SplitRefused(Exception):
    """No cut of a part satisfies its provider's limits: the batch fails with this message."""


def cut(sizes: Sequence[int], limits: JobLimits, what: str) -> list[tuple[int, int]]:
    """The fewest consecutive jobs [i, j) of a part whose lines take `sizes` bytes each, every one
    within `limits`; near-equal by lines (so the last job is not left below min_requests) where
    that costs at most NEAR_EQUAL_TRIES jobs more than the fewest. SplitRefused naming the
    numbers when no cut fits. Linear in the lines: the sizes of a hostile file (one request near
    the byte limit among small ones) must not make it search every job count. A line of size 0
    is never sent (its provider cannot translate it: an error line of its job): only the others
    count as the job's requests (``_cut_sent``)."""
    if 0 in sizes:
        return _cut_sent(sizes, limits, what)
    n = len(sizes)
    if n < limits.min_requests:
        raise SplitRefused(f"{what} has {n} requests; a job there takes at least {limits.min_requests}")
    max_bytes = limits.max_bytes
    if max_bytes is not None:
        largest = max(sizes, default=0)
        if largest > max_bytes:
            raise SplitRefused(f"{what} has a request of {largest} bytes once translated; a job there takes "
                               f"at most {max_bytes} bytes")
    prefix = array("Q", [0])
    prefix.extend(accumulate(sizes))
    jobs = max(1, math.ceil(n / limits.max_requests) if limits.max_requests else 1,
               math.ceil(prefix[-1] / max_bytes) if max_bytes else 1)
    near_equal = _near_equal(prefix, jobs, limits)
    if near_equal is not None:  # the usual case: sizes alike, the lower bound fits
        return near_equal
    fewest = _fewest_jobs(prefix, limits)
    if fewest is None:
        raise SplitRefused(
            f"{what} ({n} requests, {prefix[-1]} bytes once translated) cannot be cut into jobs of at most "
            f"{limits.max_requests or 'any number of'} requests and {max_bytes} bytes with at least "
            f"{limits.min_requests} requests each")
    for jobs in range(len(fewest), len(fewest) + NEAR_EQUAL_TRIES + 1):
        near_equal = _near_equal(prefix, jobs, limits)
        if near_equal is not None:
            return near_equal
    return fewest


def _cut_sent(sizes: Sequence[int], limits: JobLimits, what: str) -> list[tuple[int, int]]:
    """`cut` of a part holding lines that are never sent (size 0): the sent lines are cut, so that no job
    has fewer records to send than its provider's minimum (Bedrock refuses such a job) or more than its
    maximum, and each line never sent goes with the job of the sent line before it (the first job: the
    ones before any). A part whose sent lines are too few for one job is one job, which its provider
    refuses at submit as it refuses a batch under its minimum (BATCH_TOO_SMALL, no job created)."""
    sent = [i for i, size in enumerate(sizes) if size]
    if len(sent) < limits.min_requests:
        return [(0, len(sizes))]
    jobs = cut([sizes[i] for i in sent], limits, what)
    bounds = [0, *(sent[first] for first, _ in jobs[1:]), len(sizes)]
    return list(pairwise(bounds))


# Extra jobs a near-equal cut may take over the fewest (and job counts tried for one).
NEAR_EQUAL_TRIES = 8


def _near_equal(prefix: array, jobs: int, limits: JobLimits) -> list[tuple[int, int]] | None:
    """`jobs` jobs of near-equal line counts, or None when one of them breaks `limits`."""
    n = len(prefix) - 1
    if n // jobs < limits.min_requests:
        return None
    bounds = [n * i // jobs for i in range(jobs + 1)]
    if limits.max_bytes is not None and any(prefix[b] - prefix[a] > limits.max_bytes
                                            for a, b in zip(bounds, bounds[1:])):
        return None
    return list(zip(bounds, bounds[1:]))


def _fewest_jobs(prefix: array, limits: JobLimits) -> list[tuple[int, int]] | None:
    """A cut into the fewest jobs within `limits` (None: there is none). One pass: jobs[j], the
    fewest jobs of the first j lines, is 1 + the least jobs[i] over the starts i whose job
    (i, j] fits; those starts form a window that only moves forward, kept as a deque of
    increasing jobs[i] (a sliding-window minimum)."""
    n = len(prefix) - 1
    unreachable = n + 1
    least = max(1, limits.min_requests)
    most = limits.max_requests or n
    jobs = array("I", [unreachable]) * (n + 1)
    start_of = array("I", [0]) * (n + 1)
    jobs[0] = 0
    window: deque[int] = deque()
    entering = 0
    for j in range(1, n + 1):
        while entering <= j - least:  # jobs of at least `least` lines end at j from here
            if jobs[entering] != unreachable:
                while window and jobs[window[-1]] >= jobs[entering]:
                    window.pop()
                window.append(entering)
            entering += 1
        while window and (j - window[0] > most or (limits.max_bytes is not None
                                                   and prefix[j] - prefix[window[0]] > limits.max_bytes)):
            window.popleft()  # too long a job from there now, and for every later end too
        if window:
            jobs[j], start_of[j] = jobs[window[0]] + 1, window[0]
    if jobs[n] == unreachable:
        return None
    bounds = [n]
    while bounds[-1]:
        bounds.append(start_of[bounds[-1]])
    bounds.reverse()
    return list(zip(bounds, bounds[1:]))


@dataclass
class Measured:
    """One planned part during the split: the byte offset and translated size of each of its lines."""

    part: PlannedPart
    deployment: Deployment
    provider: BatchProvider
    offsets: array = field(default_factory=lambda: array("Q"))
    sizes: array = field(default_factory=lambda: array("I"))
    # Where the part's lines go as the provider receives them (BatchProvider.request_bytes), for
    # its shards' submits (core/prepared_input.py); None: not kept.
    writer: PartWriter | None = None


# Lines one thread hop measures: ~0.1 s of Anthropic translation, a few hops per second at most.
MEASURE_BLOCK_LINES = 2000


class _PartMeasurer:
    """The CPU side of measure_parts, run in a thread one block of lines at a time: each line ->
    its group -> its planned part (by ordinal), whose offsets and translated sizes it joins. The
    blocks come in file order and one at a time, so the result is the same as in one pass."""

    def __init__(self, measured: Sequence[Measured], single_group: bool) -> None:
        self.by_group: dict[tuple[str, str], list[Measured]] = {}
        for m in measured:
            self.by_group.setdefault((m.part.endpoint, m.part.model), []).append(m)
        self.only = next(iter(self.by_group)) if single_group and len(self.by_group) == 1 else None
        self.ordinals: dict[tuple[str, str], int] = {}

    def measure_run(self, at: int, run: Sequence[bytes]) -> list[tuple[Measured, list[bytes]]]:
        """`run`: raw lines from byte `at` (BlobStore.line_runs_at); blank ones are no request."""
        return self.measure(list(request_lines_at(at, run)))

    def measure(self, block: Sequence[tuple[int, bytes]]) -> list[tuple[Measured, list[bytes]]]:
        """Measures `block` into the parts; returns each part's lines as its provider receives them,
        for its writer (write_prepared)."""
        written: dict[int, tuple[Measured, list[bytes]]] = {}  # by id(): a block's lines of each part
        for offset, line in block:
            group = self.only or line_group(line)
            ordinal = self.ordinals.get(group, 0)
            self.ordinals[group] = ordinal + 1
            for m in self.by_group.get(group, ()):
                if m.part.start <= ordinal < m.part.end:
                    m.offsets.append(offset)
                    sent = m.provider.request_bytes(m.part.endpoint, m.deployment, line) if m.writer else None
                    if sent is None:
                        m.writer = None  # this provider makes its input otherwise: nothing is kept
                        m.sizes.append(m.provider.request_size(m.part.endpoint, m.deployment, line))
                    else:
                        m.sizes.append(len(sent) + 1)
                        written.setdefault(id(m), (m, []))[1].append(sent)
                    break
        return list(written.values())


def write_prepared(written: Sequence[tuple[Measured, list[bytes]]]) -> None:
    for m, lines in written:
        if m.writer is not None:
            m.writer.write(lines)


async def measure_parts(blobs: BlobStore, file_id: str, measured: Sequence[Measured], single_group: bool) -> None:
    """One pass over the input `file_id`, measuring each line into its planned part (see
    _PartMeasurer). The reading stays on the loop; decoding and translating each line go to a thread,
    a block of lines at a time: Anthropic's translation of 200,000 lines is seconds of CPU the loop
    would owe every RPC. single_group: the file has one group, no line needs decoding. SplitRefused
    when the file does not hold the lines planned. A cancel leaves `measured` half filled: a split
    redone measures into new ones."""
    measurer = _PartMeasurer(measured, single_group)
    # A block's prepared lines are written on another thread while the next block is measured
    # (the write's copy into the page cache runs without the GIL): one write in flight, in order.
    writing: asyncio.Future | None = None
    try:
        async for at, run in blobs.line_runs_at(file_id):
            for first in range(0, len(run), MEASURE_BLOCK_LINES):
                block = run[first:first + MEASURE_BLOCK_LINES]
                written = await asyncio.to_thread(measurer.measure_run, at, block)
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(write_prepared, written)) if written else None
                at += sum(map(len, block)) + len(block)
        if writing is not None:
            await writing
    finally:
        if writing is not None and not writing.done():
            await asyncio.wait([writing])  # a cancel: the writers are closed after (see _measure), not under it
    for m in measured:
        if len(m.sizes) != m.part.count:
            raise SplitRefused(f"the input has {len(m.sizes)} of the {m.part.count} requests planned for "
                               f"{m.part.model!r} on {m.deployment.id}")


class _CustomId(msgspec.Struct):
    custom_id: str = ""


_decode_custom_id = msgspec.json.Decoder(_CustomId).decode


def _custom_id(line: bytes) -> str:
    try:
        return _decode_custom_id(line).custom_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


def ended_as(parent: BatchRecord, shards: Sequence[BatchRecord]) -> BatchStatus:
    """The parent's end from its shards' (all ended): cancelled once a cancel was accepted;
    failed only when every shard failed; expired when every shard failed or expired and one
    expired; completed otherwise (partial results kept)."""
    if parent.status is BatchStatus.CANCELLING:
        return BatchStatus.CANCELLED
    statuses = {s.status for s in shards}
    if statuses == {BatchStatus.FAILED}:
        return BatchStatus.FAILED
    if BatchStatus.EXPIRED in statuses and statuses <= {BatchStatus.FAILED, BatchStatus.EXPIRED}:
        return BatchStatus.EXPIRED
    return BatchStatus.COMPLETED


def _no_result_error(shard: BatchRecord) -> tuple[str, str]:
    """(code, message) of the error line of a shard's request it has no line for."""
    if shard.status is BatchStatus.FAILED and shard.errors:
        return shard.errors[0].code, shard.errors[0].message
    if shard.status is BatchStatus.EXPIRED:
        return "batch_expired", "This request could not be executed before the completion window expired."
    if shard.status is BatchStatus.CANCELLED:
        return "batch_cancelled", "This request was not executed because the batch was cancelled."
    return "batch_failed", "This request got no answer from the provider."


class ShardedBatchRunner(BatchRunner):
    """Drives a sharded parent (see the module docstring); persistence, cancel intake and lease
    handling are BatchRunner's."""

    def __init__(self, tracker: Tracker, record: BatchRecord, *, load_reserved: bool = False) -> None:
        super().__init__(tracker, record, load_reserved=load_reserved)
        self._cancel_propagated = False
        for shard in record.shards:
            tracker.follow_shard(shard.id, record.id)
        # Until the split has adopted the shards, the parent counts their load in the router, so
        # that creates close together see it (CreateBatch reserved it; a restart, when the batch
        # is not split yet, here). Split already: the shards count their own.
        self._plan_load = [] if record.shards else [(p.deployment_id, batch_load(p.count)) for p in record.plan]

    def _release_plan_load(self) -> None:
        for deployment_id, load in self._plan_load:
            self.t.router.remove_load(deployment_id, load)
        self._plan_load = []

    async def run(self) -> None:
        rec = self.rec
        log_context.bind(batch_id=rec.id, project=rec.project, file_id=rec.input_file_id)
        storage_backoff = Backoff(base=0.5, cap=5.0)
        if not self._load_reserved:
            for deployment_id, load in self._plan_load:
                self.t.router.add_load(deployment_id, load)
        try:
            while not self.rec.status.is_terminal:
                try:
                    await self._advance()
                    storage_backoff.reset()
                except (StorageFull, StorageUnavailable, RevisionConflict, OSError) as err:
                    log.warning("batch %s: storage error (%s: %s), retrying", rec.id, type(err).__name__, err)
                    await self._reread()
                    await self._sleep(storage_backoff.next())
        except LeaseLost:
            log.warning("batch %s: lease lost; another replica drives it now", rec.id)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug must not leave the batch hanging forever
            log.exception("batch %s: unexpected error", rec.id)
            try:
                await self._fail("internal_error", f"batchgate failed to run this batch: {type(err).__name__}")
            except Exception:
                log.exception("batch %s: could not record the failure", rec.id)
        finally:
            self._release_plan_load()  # every end: failed split, cancel while validating, lease lost
            self.t._forget(rec.id)

    async def _reread(self) -> None:
        try:
            stored = await self.t.store.get_batch(self.rec.id)
        except StorageError:
            return
        if stored is not None and stored.revision != self.rec.revision:
            self.rec = stored

    async def _advance(self) -> None:
        if not self.rec.shards:
            if self.rec.status is BatchStatus.CANCELLING:
                await self._cancel_before_submission()  # nothing split, nothing submitted
                return
            await self._split()
            return
        shards = await self._read_shards()
        if self.rec.status is BatchStatus.CANCELLING and not self._cancel_propagated:
            await self._propagate_cancel(shards)
        if all(s.status.is_terminal for s in shards):
            self.t.prepared.forget(self.rec.id, [s.id for s in shards])  # no submit is left to read them
            await self._merge(shards)
            return
        await self._show(shards)
        await self._sleep(FOLLOW_INTERVAL)
        # Shards moving together wake this runner in bursts: at most one re-read (and revision of
        # the batch) per min_poll_interval, as a single job's poll loop coalesces its progress.
        await asyncio.sleep(self.t.min_poll_interval)

    # -- split ----------------------------------------------------------------------------

    async def _split(self) -> None:
        rec = self.rec
        source = await self.t.store.get_file(rec.input_file_id)
        single_group = source is None or len(source.groups) <= 1  # no groups kept: one group
        try:
            measured = await self._measure(single_group)
            cuts = [cut(m.sizes, m.provider.limits(m.part.endpoint, m.deployment),
                        f"the {m.part.count} requests for {m.part.model!r} on {m.deployment.id}") for m in measured]
        except SplitRefused as err:
            self.t.prepared.forget(rec.id, [])
            await self._fail("shard_limits", str(err))
            return
        except BaseException:
            self.t.prepared.forget(rec.id, [])
            raise
        shards: list[BatchRecord] = []
        prepared: list[tuple[str, PreparedRange]] = []
        for m, jobs in zip(measured, cuts):
            ends = list(accumulate(m.sizes, initial=0)) if m.writer is not None else None
            for first, last in jobs:
                d = m.deployment
                if ends is not None:
                    prepared.append((f"{rec.id}_s{len(shards) + 1}", PreparedRange(
                        m.writer.path, ends[first], ends[last] - ends[first], d.id, d.provider, d.model)))
                shards.append(BatchRecord(
                    id=f"{rec.id}_s{len(shards) + 1}", project=rec.project, endpoint=m.part.endpoint,
                    input_file_id=rec.input_file_id, completion_window=rec.completion_window,
                    status=BatchStatus.VALIDATING, created_at=rec.created_at, expires_at=rec.expires_at,
                    model=d.model_name, provider=d.provider, deployment_id=d.id, input_line_count=last - first,
                    api_key_id=rec.api_key_id, metadata=dict(rec.metadata),
                    price=self.t.accounting.snapshot(d.model, d.model_info, d.provider), parent_id=rec.id,
                    selection=ShardSelection(endpoint=m.part.endpoint, model=m.part.model,
                                             start=m.part.start + first, end=m.part.start + last,
                                             byte_offset=m.offsets[first] if last > first else 0,
                                             single_group=single_group)))
        now = time.time()

        def split(r: BatchRecord) -> None:
            if r.status is BatchStatus.CANCELLING:
                # A cancel came in while splitting: the shards start cancelled, nothing is submitted.
                for shard in shards:
                    shard.status, shard.cancelling_at = BatchStatus.CANCELLING, r.cancelling_at or now
            else:
                self._enter(BatchStatus.IN_PROGRESS)(r)
            r.shards = [self._summary(s) for s in shards]
            r.request_counts = RequestCounts(total=sum(s.input_line_count for s in shards))

        await self._persist(split, shards=shards)
        log.info("batch %s split into %d jobs: %s", rec.id, len(shards),
                 ", ".join(f"{s.id} ({s.input_line_count} on {s.deployment_id})" for s in shards))
        for shard_id, prepared_range in prepared:
            self.t.prepared.register(shard_id, prepared_range)
        for shard in shards:
            self.t.follow_shard(shard.id, rec.id)
            if not self.t.stopping and self.t.runner(shard.id) is None:  # else the next start adopts them
                # The shard's load counts from this moment on (not when its task first runs), as
                # the parent's reservation is released right after.
                self.t.router.add_load(shard.deployment_id, batch_load(shard.input_line_count))
                self.t.adopt(shard, load_reserved=True)
        self._release_plan_load()

    async def _measure(self, single_group: bool) -> list[Measured]:
        measured = []
        for index, part in enumerate(sorted(self.rec.plan, key=lambda p: (p.endpoint, p.model, p.start))):
            deployment = self.t.router.deployment(part.deployment_id)
            if deployment is None:
                raise SplitRefused(f"deployment {part.deployment_id!r} is no longer in the model list")
            measured.append(Measured(part, deployment, self.t.providers.get(deployment.provider),
                                     writer=PartWriter(self.t.prepared.part_path(self.rec.id, index))))
        try:
            await measure_parts(self.t.blobs, self.rec.input_file_id, measured, single_group)
        finally:
            for m in measured:
                if m.writer is not None and not m.writer.close():
                    m.writer = None  # a write failed: its shards build their input
        return measured

    # -- follow ---------------------------------------------------------------------------

    async def _read_shards(self) -> list[BatchRecord]:
        shards = []
        for summary in self.rec.shards:
            shard = await self.t.store.get_batch(summary.id)
            if shard is None:
                raise RuntimeError(f"shard {summary.id} of batch {self.rec.id} is missing")
            shards.append(shard)
        return shards

    def _summary(self, shard: BatchRecord) -> ShardSummary:
        try:
            job_id = self.t.providers.get(shard.provider).job_id(shard.provider_state)
        except Exception:  # noqa: BLE001 - shown to operators only; a provider gone from the build shows none
            job_id = ""
        return ShardSummary(id=shard.id, endpoint=shard.endpoint, model=shard.model, provider=shard.provider,
                            deployment_id=shard.deployment_id, provider_job_id=job_id, status=shard.status,
                            request_counts=RequestCounts(shard.request_counts.total or shard.input_line_count,
                                                         shard.request_counts.completed,
                                                         shard.request_counts.failed),
                            errors=list(shard.errors), cost=shard.cost)

    async def _show(self, shards: Sequence[BatchRecord]) -> None:
        summaries = [self._summary(s) for s in shards]
        counts = RequestCounts(total=sum(s.request_counts.total for s in summaries),
                               completed=sum(s.request_counts.completed for s in summaries),
                               failed=sum(s.request_counts.failed for s in summaries))
        if summaries == self.rec.shards and counts == self.rec.request_counts:
            return

        def show(r: BatchRecord) -> None:
            r.shards = summaries
            r.request_counts = counts

        await self._persist(show)

    async def _propagate_cancel(self, shards: Sequence[BatchRecord]) -> None:
        for shard in shards:
            if not shard.status.is_terminal and shard.status is not BatchStatus.CANCELLING:
                await cancel_batch(self.t, shard)
        self._cancel_propagated = True

    # -- merge ----------------------------------------------------------------------------

    async def _merge(self, shards: Sequence[BatchRecord]) -> None:
        rec = self.rec
        if not rec.result_file_ids:
            def prepare(r: BatchRecord) -> None:
                r.result_file_ids = [new_file_id(), new_file_id()]
                if r.status is not BatchStatus.CANCELLING:
                    self._enter(BatchStatus.FINALIZING)(r)
                r.shards = [self._summary(s) for s in shards]

            await self._persist(prepare)
        collected = await collect_results(self._merged_lines(shards), self.t.blobs, self.rec, None, time.time())
        usage = Usage()
        for shard in shards:
            if shard.usage is not None:
                usage.add(shard.usage)
        ended = ended_as(self.rec, shards)

        def finish(r: BatchRecord) -> None:
            status = BatchStatus.CANCELLED if r.status is BatchStatus.CANCELLING else ended
            self._enter(status)(r)
            collected.record_on(r, total=sum(s.input_line_count for s in shards))
            r.usage = usage
            r.cost = sum_costs([s.cost for s in shards])
            r.shards = [self._summary(s) for s in shards]
            if status is BatchStatus.FAILED:
                r.errors = [e for s in shards for e in s.errors][:MAX_PARENT_ERRORS]

        try:
            await self._persist(finish, extra_files=collected.files)
        except asyncio.CancelledError:
            raise  # the shielded write may still land: a redone merge writes the same ids
        except BaseException:
            await collected.discard(self.t.blobs)
            raise
        log.info("batch %s %s: %d ok, %d failed over %d jobs", rec.id, self.rec.status.value, collected.out_lines,
                 collected.err_lines, len(shards))
        await self._delete_shard_results(shards)

    async def _merged_lines(self, shards: Sequence[BatchRecord]) -> AsyncIterator[ResultLine]:
        """Every shard's result lines, then for each shard an error line for every request of it
        that has none (collect_results yields to the loop every YIELD_EVERY_LINES lines)."""
        for shard in shards:
            seen: set[str] = set()
            missing_possible = (shard.request_counts.completed + shard.request_counts.failed) < shard.input_line_count
            answered = 0
            for file_id, kind in ((shard.output_file_id, ResultKind.OUTPUT), (shard.error_file_id, ResultKind.ERROR)):
                if not file_id:
                    continue
                async for line in self.t.blobs.lines(file_id):
                    yield ResultLine(kind, line)
                    answered += 1
                    if missing_possible:
                        seen.add(_custom_id(line))
            if answered >= shard.input_line_count:
                continue
            code, message = _no_result_error(shard)
            assert shard.selection is not None
            index = 0
            async for line in selection_lines(self.t.blobs, shard.input_file_id, shard.selection):
                custom_id = _custom_id(line)
                if custom_id not in seen:
                    yield no_result_line(line_id(shard.id, index), custom_id, code, message)
                index += 1

    async def _delete_shard_results(self, shards: Sequence[BatchRecord]) -> None:
        """The merged files hold the shards' results now: their own files go (rows, then blobs)."""
        for shard in shards:
            for file_id in (shard.output_file_id, shard.error_file_id):
                if not file_id:
                    continue
                try:
                    await self.t.store.delete_file(file_id)
                    await self.t.blobs.delete(file_id)
                except (StorageError, OSError) as err:
                    log.warning("batch %s: could not delete shard result file %s: %s", self.rec.id, file_id, err)
