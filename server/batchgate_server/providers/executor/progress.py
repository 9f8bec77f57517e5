"""The executor's answers, shared with the other replicas.

The results log (results_log.py) is local: on another machine it is gone. When several replicas
share the database, a run also appends what it answered to the job's SharedProgress every
FLUSH_INTERVAL seconds (one segment: the new whole lines of both files), and saves everything
before it reports its outcome. A replica that takes the batch over rebuilds the results log from
the segments and resumes from there: answered requests are not sent again, except those answered
in the last second before the old owner died (their answers were never stored anywhere, so they
are sent once more and answered once).

The local log is kept, not rebuilt, when the last segment was written by the run that wrote it
(the marker file names that run): it is the same history, and maybe a second longer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from batchgate_server.providers.base import ProviderJob
from batchgate_server.providers.executor.results_log import ERROR_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
WRITER_FILE = "writer"


@dataclass
class Flushed:
    """How much of the local results log the shared segments hold."""

    writer: str  # the run whose lines go into the next segments
    seq: int  # the next segment's number
    output: int  # bytes of output.jsonl stored
    errors: int  # bytes of errors.jsonl stored


def _custom_id(raw: bytes) -> str | None:
    try:
        return json.loads(raw)["custom_id"]
    except (ValueError, KeyError, TypeError):
        return None


def _rebuild(workdir: Path, segments: list[tuple[str, bytes, bytes]], writer: str) -> tuple[int, int]:
    """Write the results log from `segments` (the first answer of a custom_id wins, should two
    runs ever have stored one each); returns the two files' sizes."""
    workdir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    sizes = []
    for index, name in ((1, OUTPUT_NAME), (2, ERROR_NAME)):
        tmp = workdir / (name + ".tmp")
        size = 0
        with open(tmp, "wb") as fh:
            for segment in segments:
                for raw in segment[index].splitlines(keepends=True):
                    custom_id = _custom_id(raw)
                    if custom_id is None or custom_id in seen:
                        continue
                    seen.add(custom_id)
                    fh.write(raw)
                    size += len(raw)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(workdir / name)
        sizes.append(size)
    (workdir / WRITER_FILE).write_text(writer)
    return sizes[0], sizes[1]


def _local_writer(workdir: Path) -> str:
    try:
        return (workdir / WRITER_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


async def restore(job: ProviderJob) -> Flushed | None:
    """Before a run opens its results log: make the local log the batch's latest stored history.
    None when the job keeps no shared progress (one server)."""
    if job.progress is None:
        return None
    segments = await job.progress.read()
    local = await asyncio.to_thread(_local_writer, job.workdir)
    if not segments or segments[-1][0] == local:
        writer = local or f"run-{secrets.token_hex(6)}"
        if not local:
            await asyncio.to_thread(_mark, job.workdir, writer)
        return Flushed(writer, len(segments), sum(len(s[1]) for s in segments), sum(len(s[2]) for s in segments))
    writer = f"run-{secrets.token_hex(6)}"
    output, errors = await asyncio.to_thread(_rebuild, job.workdir, segments, writer)
    log.info("batch %s: resumed from %d stored segment(s) of answers", job.batch_id, len(segments))
    return Flushed(writer, len(segments), output, errors)


def _mark(workdir: Path, writer: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WRITER_FILE).write_text(writer)


def _read_range(path: Path, start: int, end: int) -> bytes:
    if end <= start:
        return b""
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


class ProgressFlusher:
    """Appends the new whole lines of a run's results log to the job's shared progress."""

    def __init__(self, job: ProviderJob, flushed: Flushed, ends) -> None:
        self.job = job
        self.flushed = flushed
        self._ends = ends  # () -> (output bytes, error bytes) of whole lines written so far
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        # The last segment sent when its append raised: (seq, output, errors, ends). It may be
        # stored all the same (a reply lost after the commit); the next flush finds out first.
        self._unsure: tuple[int, bytes, bytes, tuple[int, int]] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._every_interval(), name=f"flush-{self.job.batch_id}")

    async def stop(self) -> None:
        if self._task is not None:
            # Never cut a flush mid-append: its segment may be stored already with its seq not yet
            # counted, and the next flush would send that seq again (Duplicate: LeaseLost, and the
            # batch would stop here though this replica holds its lease).
            async with self._lock:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception as err:  # noqa: BLE001 - tried again; the final flush raises
                log.warning("batch %s: could not store answers for other replicas: %s", self.job.batch_id, err)

    async def flush(self) -> None:
        async with self._lock:
            f = self.flushed
            if self._unsure is not None:
                seq, output, errors, ends = self._unsure
                stored = await self.job.progress.read()
                if len(stored) > seq and stored[seq] == (f.writer, output, errors):
                    self._stored(ends)  # sending it again would be a Duplicate: LeaseLost for the run
                self._unsure = None
            out_end, err_end = self._ends()
            if out_end <= f.output and err_end <= f.errors:
                return
            workdir = self.job.workdir
            output = await asyncio.to_thread(_read_range, workdir / OUTPUT_NAME, f.output, out_end)
            errors = await asyncio.to_thread(_read_range, workdir / ERROR_NAME, f.errors, err_end)
            try:
                await self.job.progress.append(f.seq, f.writer, output, errors)
            except BaseException:
                self._unsure = (f.seq, output, errors, (out_end, err_end))
                raise
            self._stored((out_end, err_end))

    def _stored(self, ends: tuple[int, int]) -> None:
        f = self.flushed
        f.seq += 1
        f.output, f.errors = ends
