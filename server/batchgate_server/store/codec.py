"""(De)serialisation of domain records to the JSON document column."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

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


def batch_to_doc(batch: BatchRecord) -> str:
    doc = asdict(batch)
    doc["status"] = batch.status.value
    return json.dumps(doc, separators=(",", ":"))


def batch_from_doc(text: str) -> BatchRecord:
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
    )
