"""(De)serialisation of domain records to the JSON document column."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import msgspec

from batchgate_server.domain.models import (
    BatchError,
    BatchRecord,
    BatchStatus,
    Cost,
    FailureCount,
    FilePurpose,
    FileRecord,
    RequestCounts,
    Usage,
)
from batchgate_server.domain.shards import FileGroup


def batch_to_doc(batch: BatchRecord) -> str:
    doc = asdict(batch)
    doc["status"] = batch.status.value
    return json.dumps(doc, separators=(",", ":"))


# msgspec builds the dataclasses straight from the JSON (about 8x json.loads and the ** calls,
# the largest cost of a GetBatch); a document it will not type (one of an older layout) is
# read field by field as before.
_decode_batch = msgspec.json.Decoder(BatchRecord).decode


def batch_from_doc(text: str) -> BatchRecord:
    try:
        return _decode_batch(text)
    except msgspec.ValidationError:
        return _batch_from_dict(text)


def _batch_from_dict(text: str) -> BatchRecord:
    doc: dict[str, Any] = json.loads(text)
    doc["status"] = BatchStatus(doc["status"])
    doc["request_counts"] = RequestCounts(**doc["request_counts"])
    doc["errors"] = [BatchError(**e) for e in doc["errors"]]
    doc["failures"] = [FailureCount(**f) for f in doc.get("failures", ())]  # absent from older documents
    doc["usage"] = Usage(**doc["usage"]) if doc.get("usage") else None
    doc["cost"] = Cost(**doc["cost"])
    return BatchRecord(**doc)


def file_from_row(row: Any) -> FileRecord:
    return FileRecord(
        id=row["id"],
        project=row["project"],
        filename=row["filename"],
        purpose=FilePurpose(row["purpose"]),
        bytes=row["bytes"],
        sha256=row["sha256"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        line_count=row["line_count"],
        endpoint=row["endpoint"],
        model=row["model"],
        request_id=row["request_id"] or "",
        groups=groups_from_json(row["line_groups"]),
        merged_into=row["merged_into"] or "",
    )


# ensure_ascii: the column is TEXT on both backends, and a model name may hold anything JSON
# escapes (PostgreSQL TEXT takes no NUL).
def groups_to_json(groups: list[FileGroup]) -> str | None:
    """The files.line_groups column: None when there are no groups (an output file)."""
    if not groups:
        return None
    return json.dumps([asdict(g) for g in groups], separators=(",", ":"))


_decode_groups = msgspec.json.Decoder(list[FileGroup]).decode


def groups_from_json(text: str | None) -> list[FileGroup]:
    return _decode_groups(text) if text else []
