"""What a shard reads of its parent's input file (domain/shards.py ShardSelection).

A shard's lines are those of one (endpoint, body.model) group with group ordinal in
[start, end). Reading starts at the selection's byte_offset (the first of them), so a shard
reads only from where its lines begin and stops after its last. In a file of one group every
line is the group's: lines are only counted. Otherwise each line's url and body.model are
decoded (a small msgspec struct: the rest of the body is skipped, not built) and lines of
other groups passed over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from batchgate_server.domain.shards import ShardSelection
from batchgate_server.store.ports import BlobStore


class _Body(msgspec.Struct):
    model: str = ""


class _Line(msgspec.Struct):
    url: str = ""
    body: _Body | None = None


_decode_line = msgspec.json.Decoder(_Line).decode


def line_group(line: bytes) -> tuple[str, str]:
    """(endpoint, body.model) of an input line, the group it belongs to (FileGroup). The file was
    validated at upload: a line that does not decode here is of no group."""
    try:
        decoded = _decode_line(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "", ""
    return decoded.url, decoded.body.model if decoded.body is not None else ""


async def selection_lines(blobs: BlobStore, file_id: str, selection: ShardSelection) -> AsyncIterator[bytes]:
    """The input lines of `selection`, in file order (a shard's ProviderJob.open_input)."""
    ordinal = selection.start
    if ordinal >= selection.end:
        return
    group = (selection.endpoint, selection.model)
    async for line in blobs.lines(file_id, selection.byte_offset):
        if not selection.single_group and line_group(line) != group:
            continue
        yield line
        ordinal += 1
        if ordinal >= selection.end:
            return
