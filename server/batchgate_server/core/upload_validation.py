"""Where an upload's JSONL validation runs: in a worker process beside the event loop, or on the loop.

On the loop, validation and receiving take turns on one thread: the validator's ~2 ms per MiB was
most of an upload's time, and every other call waited behind each chunk. A worker process
(core/validation_process.py) validates chunk k while the loop receives, hashes and writes chunk
k+1, on another core. The hand-over is the chunk copied into a ring of shared memory the worker
reads it from, a 17-byte frame through a pipe saying where (a pipe carrying the chunk itself cost
the loop 0.4-0.5 ms per MiB, the ring ~0.1: bench/validation_handover.py), and at the end the
pickled ValidationResult back. The validator itself is the same object with the same rules, so both
places give the same result.

A pool of `size` workers (--upload-workers) is shared by all uploads; a worker is started when an
upload needs one (a server that gets no large upload starts none), and each upload goes to the
worker with the fewest uploads. An upload whose content is one chunk is validated on the loop:
there is nothing to overlap, and it needs no worker started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import mmap
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import batchgate_server
from batchgate_server.core import validation_process as wire
from batchgate_server.core.errors import Unavailable
from batchgate_server.core.jsonl_validation import JsonlValidator, ValidationResult

log = logging.getLogger(__name__)

# The ring a worker reads its uploads' chunks from: the loop runs up to this far ahead of the worker,
# in pieces of at most a quarter of it (so that the worker validates one while the next is written,
# and a piece cut at the ring's end wastes little). Its pages are the worker's fixed cost.
RING_BYTES = 4 << 20
PIECE_BYTES = RING_BYTES // 4
STOP_SECONDS = 5.0  # a worker that closed its stdout and lingers this long is killed


def worker_lost() -> Unavailable:
    return Unavailable("the process validating this upload stopped, so nothing was stored; upload the file again",
                       "VALIDATION_WORKER_LOST", retry_after=1.0)


class _Worker:
    """One validation process and the uploads it holds."""

    def __init__(self, popen: subprocess.Popen, stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader,
                 ring: mmap.mmap) -> None:
        self.popen = popen
        self.stdin = stdin
        # The ring, in bytes counted from its start for ever: [freed, written) holds pieces the
        # worker has not taken yet; `ends` is where each of them ends, oldest first.
        self.ring = ring
        self.written = 0
        self.freed = 0
        self.ends: collections.deque[int] = collections.deque()
        self.room: list[asyncio.Future] = []  # feeds waiting for the worker to take a piece
        self.uploads = 0  # open on this worker now
        self.numbers = itertools.count(1)
        self.answers: dict[int, asyncio.Future] = {}
        self.lost = False
        self.reader = asyncio.create_task(self._read_answers(stdout), name=f"validation-worker-{popen.pid}")

    async def _read_answers(self, stdout: asyncio.StreamReader) -> None:
        try:
            while True:
                status, upload, length = wire.FRAME.unpack(await stdout.readexactly(wire.FRAME.size))
                payload = await stdout.readexactly(length)
                if status == wire.TAKEN:
                    self.freed = self.ends.popleft()
                    self._wake()
                    continue
                if status not in (wire.RESULT, wire.FAILED):
                    raise ValueError(f"an answer of no known kind ({status})")
                waiter = self.answers.pop(upload, None)
                if waiter is None or waiter.done():
                    continue  # its upload went away while the worker finished it
                if status == wire.RESULT:
                    waiter.set_result(pickle.loads(payload))
                else:
                    waiter.set_exception(RuntimeError(f"the upload validator failed:\n{payload.decode()}"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker ended (stopped, or killed)
        except Exception:
            # An answer that cannot be read (not one of the protocol's): nothing more from this
            # worker can be trusted; its uploads fail as if it had died.
            log.exception("validation worker %d sent an answer the server cannot read: killed", self.popen.pid)
            self.popen.kill()
        finally:
            self._lose()
        # Its stdout ends as it exits: reap it (killed if it lingers).
        try:
            await asyncio.wait_for(asyncio.to_thread(self.popen.wait), STOP_SECONDS)
        except TimeoutError:
            self.popen.kill()
            await asyncio.to_thread(self.popen.wait)
        self.ring.close()

    def _wake(self) -> None:
        room, self.room = self.room, []
        for waiter in room:
            if not waiter.done():
                waiter.set_result(None)

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            if self.uploads:
                log.warning("validation worker %d ended with %d upload(s) open", self.popen.pid, self.uploads)
        for waiter in self.answers.values():
            if not waiter.done():
                waiter.set_exception(worker_lost())
        self.answers.clear()
        self._wake()

    def send(self, op: int, upload: int, payload: bytes | memoryview = b"") -> None:
        if self.lost or self.stdin.is_closing():
            self._lose()
            raise worker_lost()
        self.stdin.write(wire.FRAME.pack(op, upload, len(payload)))
        if payload:
            self.stdin.write(payload)

    async def feed(self, upload: int, piece: memoryview) -> None:
        """Copy `piece` (at most PIECE_BYTES) into the ring, once the worker has taken enough, and
        tell the worker where it lies."""
        size = len(piece)
        while True:
            if self.lost:
                raise worker_lost()
            at = self.written % RING_BYTES
            skipped = RING_BYTES - at if at + size > RING_BYTES else 0  # a piece is never cut in two
            if self.written + skipped + size - self.freed <= RING_BYTES:
                break
            waiter = asyncio.get_running_loop().create_future()
            self.room.append(waiter)
            await waiter
        at = (self.written + skipped) % RING_BYTES
        self.ring[at:at + size] = piece
        self.send(wire.FEED, upload, wire.PIECE.pack(at, size))
        self.written += skipped + size
        self.ends.append(self.written)

    async def drain(self) -> None:
        try:
            await self.stdin.drain()
        except ConnectionError:
            self._lose()
            raise worker_lost() from None

    async def stop(self) -> None:
        """End the worker: its stdin closes, it reads to the end and exits. One that has not ended
        STOP_SECONDS later (stopped by a signal, or stuck) is killed: the server's stop waited for
        it for ever."""
        with contextlib.suppress(ConnectionError):
            self.stdin.close()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await asyncio.wait_for(asyncio.shield(self.reader), STOP_SECONDS)
            except TimeoutError:
                log.warning("validation worker %d did not end %.0f s after its input closed: killed", self.popen.pid,
                            STOP_SECONDS)
                self.popen.kill()
                await self.reader


class ValidationWorkers:
    """Up to `size` worker processes, shared by the uploads of the server."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._workers: list[_Worker] = []
        self._ended: list[_Worker] = []  # lost workers, awaited at close
        self._starting = asyncio.Lock()
        self._closed = False

    def pids(self) -> list[int]:
        """The processes running now (for operators and benches: their memory is the server's too)."""
        return [w.popen.pid for w in self._workers if not w.lost]

    def open_uploads(self) -> int:
        """Uploads held by the workers now."""
        return sum(w.uploads for w in self._workers if not w.lost)

    async def _worker(self) -> _Worker | None:
        """The worker for a new upload, started if every running one is busy and the pool has room;
        None when none can be started (uploads then validate on the loop)."""
        async with self._starting:
            self._ended.extend(w for w in self._workers if w.lost)  # reaped by their reader tasks
            self._workers = [w for w in self._workers if not w.lost]
            least_busy = min(self._workers, key=lambda w: w.uploads, default=None)
            if least_busy is not None and (least_busy.uploads == 0 or len(self._workers) >= self.size):
                return least_busy
            try:
                worker = await _start_worker()
            except OSError as err:
                log.warning("cannot start a validation worker (%s): validating on the event loop", err)
                return least_busy
            self._workers.append(worker)
            return worker

    async def open(self, validator_args: dict[str, Any]) -> WorkerValidation | None:
        if self._closed or self.size <= 0:
            return None
        worker = await self._worker()
        if worker is None:
            return None
        upload = next(worker.numbers) & 0xFFFFFFFF
        try:
            worker.send(wire.OPEN, upload, pickle.dumps(validator_args))
        except Unavailable:
            return None  # it ended just now, before anything of this upload reached it: validate on the loop
        worker.uploads += 1
        return WorkerValidation(worker, upload)

    async def close(self) -> None:
        self._closed = True
        workers, self._workers, self._ended = self._workers + self._ended, [], []
        await asyncio.gather(*(w.stop() for w in workers))


async def _start_worker() -> _Worker:
    """A worker process, its pipes on the loop. subprocess (vfork and exec) starts it, not the loop:
    uvloop's spawn forks, and gRPC's fork handlers then complain on every start."""
    # The worker imports this package from where the server does, whatever its working directory.
    root = str(Path(batchgate_server.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    ring_fd, ring = _ring()
    try:
        popen = subprocess.Popen([sys.executable, "-m", wire.__name__, str(ring_fd)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, bufsize=0, pass_fds=(ring_fd,))
    except BaseException:
        ring.close()
        raise
    finally:
        os.close(ring_fd)  # the worker has its own now; the mapping needs none
    loop = asyncio.get_running_loop()
    try:
        stdout = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), popen.stdout)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), popen.stdin)
    except BaseException:
        popen.kill()
        popen.wait()
        ring.close()
        raise
    return _Worker(popen, asyncio.StreamWriter(transport, protocol, None, loop), stdout, ring)


def _ring() -> tuple[int, mmap.mmap]:
    """A new ring: shared memory (a memfd, Linux) of RING_BYTES, its pages faulted in, as its
    descriptor (close-on-exec: only pass_fds hands it on) and the loop's mapping of it. OSError where
    there is no memfd."""
    if not hasattr(os, "memfd_create"):
        raise OSError("no memfd_create on this system")
    fd = os.memfd_create("batchgate-upload-ring")
    try:
        os.ftruncate(fd, RING_BYTES)
        return fd, mmap.mmap(fd, RING_BYTES, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        os.close(fd)
        raise


class WorkerValidation:
    """One upload's validation on a worker."""

    def __init__(self, worker: _Worker, upload: int) -> None:
        self._worker = worker
        self._upload = upload
        self._open = True

    async def feed(self, chunk: bytes) -> None:
        # In pieces of a quarter of the ring: the worker validates the first while the rest follows.
        view = memoryview(chunk)
        for start in range(0, len(chunk), PIECE_BYTES):
            await self._worker.feed(self._upload, view[start:start + PIECE_BYTES])
        await self._worker.drain()

    async def finish(self) -> ValidationResult:
        worker = self._worker
        waiter = asyncio.get_running_loop().create_future()
        worker.send(wire.FINISH, self._upload)
        worker.answers[self._upload] = waiter
        self._close()
        return await waiter

    def drop(self) -> None:
        """The upload ended without a result: the worker forgets it."""
        if self._open:
            self._close()
            with contextlib.suppress(Unavailable):
                self._worker.send(wire.DROP, self._upload)

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._worker.uploads -= 1


class InlineValidation:
    """One upload's validation on the event loop's thread."""

    def __init__(self, validator_args: dict[str, Any]) -> None:
        self._validator = JsonlValidator(**validator_args)

    async def feed(self, chunk: bytes) -> None:
        # Hashing and writing the same chunk run on worker threads meanwhile: sleep(0) lets them
        # reach their threads before validation holds the loop.
        await asyncio.sleep(0)
        self._validator.feed(chunk)

    async def finish(self) -> ValidationResult:
        return self._validator.finish()

    def drop(self) -> None:
        pass


class UploadValidation:
    """An upload's validation, fed its chunks in order. The first chunk waits until the second
    arrives (the upload goes to a worker) or the content ends (it is validated on the loop)."""

    def __init__(self, workers: ValidationWorkers | None, validator_args: dict[str, Any]) -> None:
        self._workers = workers
        self._args = validator_args
        self._first: bytes | None = None
        self._where: WorkerValidation | InlineValidation | None = None

    async def feed(self, chunk: bytes) -> None:
        if self._where is None:
            if self._first is None:
                self._first = chunk
                return
            where = await self._workers.open(self._args) if self._workers is not None else None
            self._where = where or InlineValidation(self._args)
            first, self._first = self._first, None
            await self._where.feed(first)
        await self._where.feed(chunk)

    async def finish(self) -> ValidationResult:
        if self._where is None:
            self._where = InlineValidation(self._args)
            if self._first is not None:
                first, self._first = self._first, None
                await self._where.feed(first)
        return await self._where.finish()

    def drop(self) -> None:
        self._first = None
        if self._where is not None:
            self._where.drop()
