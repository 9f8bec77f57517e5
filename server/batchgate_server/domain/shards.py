"""One logical batch run as several provider jobs (shards): the shared vocabulary.

A batch is sharded when its file mixes endpoints or models, when it is larger than one job of
its provider takes, or when it is spread across several deployments of one model. The caller
still sees one Batch; the shards are internal batch records (BatchRecord.parent_id set) that the
tracker runs like any other batch, each leased, crash-safe and billed on its own.

Three steps, each with its own data:
1. CreateBatch plans (core/shard_plan.py): from the file's line groups (FileGroup, counted at
   upload) it routes every (endpoint, model) group to one or more deployments -> PlannedPart.
   Routing errors and a part below its provider's minimum fail CreateBatch with line numbers.
2. The parent's runner splits (core/sharded.py): one pass over the input measures every line as
   its provider will receive it (BatchProvider.request_size) and cuts each planned part into
   jobs under JobLimits -> one shard record per ShardSelection, all inserted with the parent's
   move to in_progress in one transaction. Deterministic, so a split redone after a crash
   produces the same shards.
3. Shards run; the parent follows them (models.ShardSummary, aggregated status and counts), propagates
   a cancel, and when all have ended merges their result files into one output and one error file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Line numbers a FileGroup keeps for error messages (the first ones of the group).
MAX_GROUP_LINES = 10
# Distinct (endpoint, model) groups one batch file may have (more: INVALID_ARGUMENT at upload).
MAX_FILE_GROUPS = 64


@dataclass
class FileGroup:
    """The lines of one input file that share an endpoint (`url`) and a `body.model`."""

    endpoint: str
    model: str
    count: int = 0
    first_lines: list[int] = field(default_factory=list)  # 1-based, at most MAX_GROUP_LINES


@dataclass(frozen=True)
class JobLimits:
    """What one job of a provider takes. None: no limit of that kind."""

    max_requests: int | None = None
    # Bytes of the job's input as the provider receives it (after translation, see
    # BatchProvider.request_size), summed over its requests.
    max_bytes: int | None = None
    min_requests: int = 1


@dataclass
class PlannedPart:
    """Lines of one file group given to one deployment: the group's lines whose ordinal (0-based,
    counted among the group's lines only, in file order) is in [start, end)."""

    endpoint: str
    model: str  # the group's body.model in the file
    deployment_id: str
    start: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start


@dataclass
class ShardSelection:
    """Which lines of the parent's input file a shard runs: those of group (endpoint, model) with
    ordinal in [start, end). byte_offset is where the shard's first line starts in the file, so
    reading starts there. single_group: the file has only this group, no line needs parsing."""

    endpoint: str
    model: str
    start: int
    end: int
    byte_offset: int = 0
    single_group: bool = False
