"""Why requests of a batch fail: counts by error code with one sample message each, small enough
to travel in every Batch a watcher receives."""

from __future__ import annotations

from collections.abc import Iterable

from batchgate_server.domain.models import FailureCount

MAX_CODES = 8  # the eighth and later codes are counted together as OTHER
OTHER = "other"
MAX_SAMPLE_CHARS = 200


def printable(text: str, limit: int = MAX_SAMPLE_CHARS, secrets: Iterable[str] = ()) -> str:
    """`text` fit for a log line or a proto string: at most `limit` characters, credentials masked,
    lone surrogates (valid in JSON, not in UTF-8) replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


def failure_of(line: dict) -> tuple[str, str]:
    """(code, message) of an OpenAI batch error line."""
    error = line.get("error")
    if isinstance(error, dict):
        return str(error.get("code") or "error"), str(error.get("message") or "")
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    body = response.get("body")
    detail = body.get("error") if isinstance(body, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else None
    return f"http_{response.get('status_code', 0)}", str(message or "")


class FailureTally:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(secrets)
        self._by_code: dict[str, FailureCount] = {}

    def _entry(self, code: str, message: str) -> FailureCount:
        entry = self._by_code.get(code)
        if entry is None:
            if len(self._by_code) >= MAX_CODES - 1:
                code = OTHER
                entry = self._by_code.get(OTHER)
            if entry is None:
                entry = self._by_code[code] = FailureCount(
                    code=printable(code, 64), sample_message=printable(message, secrets=self._secrets))
        return entry

    def answered(self, code: str, message: str) -> None:
        """A request ended with this error (its error line was written)."""
        self._entry(code, message).count += 1

    def retried(self, code: str, message: str) -> None:
        """An attempt failed with this error and the request will be tried again."""
        self._entry(code, message).retried += 1

    def summary(self) -> list[FailureCount]:
        """Copies, most frequent first."""
        entries = sorted(self._by_code.values(), key=lambda e: (-(e.count + e.retried), e.code))
        return [FailureCount(e.code, e.count, e.retried, e.sample_message) for e in entries]
