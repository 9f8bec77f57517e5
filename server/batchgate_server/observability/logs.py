"""Log output: the classic text lines, or `--log-format json` (one object a line) carrying the
batch, file, project and deployment the line is about (domain/log_context.py). Every message
goes through the credential scrubber first: the configured secrets (the master key, every
deployment's api_key-like litellm_params, registered by app.py) and anything sent as a bearer
token are masked, so a key quoted in an upstream error or an exception never lands in a log."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable

from batchgate_server.domain import log_context

MASK = "***"
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")
_secrets: set[str] = set()


def add_secrets(values: Iterable[str]) -> None:
    """Mask these values in every log line from now on (short ones would mask ordinary words)."""
    _secrets.update(v for v in values if isinstance(v, str) and len(v) >= 6)


def scrub_secrets(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return _BEARER.sub(lambda m: m.group(1) + MASK, text) if "earer" in text or "EARER" in text else text

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": scrub_secrets(record.getMessage()),
            **log_context.current(),
        }
        if record.exc_info:
            entry["exception"] = scrub_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class ScrubbingTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub_secrets(super().format(record))


def configure(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else ScrubbingTextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
