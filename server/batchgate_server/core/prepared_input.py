"""A shard's input as its provider will receive it, written once by the split (core/sharded.py).

The split measures every line of a sharded batch's input as its provider receives it: for OpenAI
and Azure that is the rewritten line itself (BatchProvider.request_bytes), of which the split used
to keep only the length, so that each shard's submit rewrote every line a second time. The split
now also writes those lines, one file per planned part, under the parent's work directory, and
each shard is a byte range of its part's file (PreparedInputs). The shard's submit sends that
range as it is (ProviderJob.open_prepared) instead of reading the input line by line and
rewriting it: a bulk file upload.

It is a cache of this process only, never a source of truth: the registry is in memory, so a
restart (kill -9 included) or another replica running the shard finds nothing and builds the
input from the stored file as before (ProviderJob.open_input), which gives the same bytes. A part
whose file could not be written (a full disk) is simply not registered. A range that turns out
short when read (the file removed under it) is dropped from the registry before the read fails,
so the retry builds the input the usual way. A part's file goes once each of its shards has its
input at the provider, the rest with the parent's end, and whatever an earlier process left at
the next start.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from batchgate_server.domain.deployment import Deployment

log = logging.getLogger(__name__)

READ_BLOCK = 1024 * 1024
PREPARED_DIR = "prepared"


@dataclass(frozen=True)
class PreparedRange:
    """Bytes [start, start + length) of `path`: a shard's input, written for `deployment_id` (on
    `provider`, its `model`): the translation depends on those alone."""

    path: Path
    start: int
    length: int
    deployment_id: str
    provider: str
    model: str


class PartWriter:
    """The prepared lines of one planned part, appended a block at a time (in the split's thread).
    `failed` once a write fails: the part is then not prepared, and nothing more is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed = False
        self._fh: BinaryIO | None = None

    def write(self, lines: list[bytes]) -> None:
        if self.failed or not lines:
            return
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "wb")  # noqa: SIM115 - kept open across blocks, closed by close()
            lines.append(b"")  # the last line's newline
            self._fh.write(b"\n".join(lines))
        except OSError as err:
            log.warning("could not write the prepared input %s (%s): its shards build theirs", self.path, err)
            self.failed = True
            self.close()

    def close(self) -> bool:
        """Close the file; True when every block was written."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                self.failed = True
            self._fh = None
        return not self.failed


class PreparedInputs:
    """This process's prepared shard inputs, by shard id."""

    def __init__(self, work_root: Path) -> None:
        self.work_root = work_root
        self._ranges: dict[str, PreparedRange] = {}

    def part_path(self, parent_id: str, part: int) -> Path:
        return self.work_root / parent_id / PREPARED_DIR / f"part-{part}.jsonl"

    def register(self, shard_id: str, prepared: PreparedRange) -> None:
        self._ranges[shard_id] = prepared

    def opener(self, shard_id: str, deployment: Deployment) -> Callable[[], AsyncIterator[bytes]] | None:
        """ProviderJob.open_prepared of the shard: None when nothing is prepared for it here, or it
        was prepared for another deployment, provider or model than the job's (a model list
        reloaded since)."""
        prepared = self._ranges.get(shard_id)
        if prepared is None or (prepared.deployment_id, prepared.provider, prepared.model) != (
                deployment.id, deployment.provider, deployment.model):
            return None
        return lambda: self._blocks(shard_id, prepared)

    async def _blocks(self, shard_id: str, prepared: PreparedRange) -> AsyncIterator[bytes]:
        try:
            fh = await asyncio.to_thread(open, prepared.path, "rb")
        except OSError:
            self._ranges.pop(shard_id, None)
            raise
        try:
            await asyncio.to_thread(fh.seek, prepared.start)
            left = prepared.length
            while left:
                block = await asyncio.to_thread(fh.read, min(READ_BLOCK, left))
                if not block:
                    self._ranges.pop(shard_id, None)
                    raise OSError(f"the prepared input of {shard_id} ends {left} bytes early")
                left -= len(block)
                yield block
        finally:
            fh.close()

    def release(self, shard_id: str) -> None:
        """The shard's input is at its provider: its range goes, and its part's file with the last
        range of it (a batch's jobs may run for a day; the copy need not)."""
        prepared = self._ranges.pop(shard_id, None)
        if prepared is not None and all(other.path != prepared.path for other in self._ranges.values()):
            prepared.path.unlink(missing_ok=True)

    def sweep(self) -> None:
        """At start: every prepared file left by an earlier process (a crash, a shutdown during a
        split, a batch that ended on another replica) goes; none is anyone's now (the registry is
        this process's)."""
        for stale in self.work_root.glob(f"*/{PREPARED_DIR}"):
            shutil.rmtree(stale, ignore_errors=True)

    def forget(self, parent_id: str, shard_ids: list[str]) -> None:
        """The parent has ended: its shards' ranges and the files under it go."""
        for shard_id in shard_ids:
            self._ranges.pop(shard_id, None)
        shutil.rmtree(self.work_root / parent_id / PREPARED_DIR, ignore_errors=True)
