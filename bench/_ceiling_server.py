"""The upload ceiling: batchgate-server with JSONL validation replaced by a no-op, for bench/upload.py only.

Everything else an upload does (gRPC streaming, the upload protocol, sha256, the blob write, the
record) is the real server's; with nothing to validate it starts no validation worker
(--upload-workers 0), so the hand-over to a worker counts as the validated server's cost. No flag
or setting of the server reaches this: it exists only as this bench-side entry point, so
production cannot turn validation off by accident.

    python bench/_ceiling_server.py <batchgate-server arguments>
"""

from __future__ import annotations

import sys

from batchgate_server import cli
from batchgate_server.core import upload_validation
from batchgate_server.core.jsonl_validation import ValidationResult


class NoValidation:
    """JsonlValidator's interface, checking nothing: every file is one valid request line."""

    def __init__(self, **_limits: object) -> None:
        self.too_large = False

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> ValidationResult:
        return ValidationResult(line_count=1, endpoint="/v1/chat/completions", model="ceiling")


if __name__ == "__main__":
    upload_validation.JsonlValidator = NoValidation
    cli.main([*sys.argv[1:], "--upload-workers", "0"])
