"""Webhook endpoints and the outbox of events waiting to be delivered to them.

An event is OpenAI's webhook event shape (`{"id": "evt_…", "object": "event", "created_at",
"type", "data": {"id": batch_id}}`), signed as the Standard Webhooks specification says. Its body
is fixed when the batch ends, so every retry sends the same bytes under the same webhook-id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import urllib.parse
from dataclasses import dataclass, field

from batchgate_server.domain.models import BatchStatus

# The terminal status -> OpenAI's event type.
EVENT_TYPES = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}
ALL_EVENTS = tuple(EVENT_TYPES.values())
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def new_endpoint_id() -> str:
    return "wh_" + secrets.token_hex(12)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 24 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def event_body(event_id: str, event_type: str, batch_id: str, created_at: int) -> str:
    return json.dumps({"id": event_id, "object": "event", "created_at": created_at, "type": event_type,
                       "data": {"id": batch_id}}, separators=(",", ":"))


@dataclass
class WebhookEndpoint:
    id: str
    project: str
    url: str
    secret: str = field(repr=False)  # whsec_…; never logged
    events: tuple[str, ...] = ALL_EVENTS
    created_at: float = 0.0
    from_config: bool = False  # configured in the config file, not through WebhookService


@dataclass
class OutboxEvent:
    """One event for one endpoint: (event_id, endpoint_id) is its key."""

    event_id: str
    endpoint_id: str
    project: str
    batch_id: str
    event_type: str
    body: str
    created_at: float
    attempts: int = 0  # deliveries tried so far
    next_attempt_at: float = 0.0
    delivered_at: float | None = None
    given_up_at: float | None = None  # the retry schedule ran out
    last_error: str = ""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (ValueError when it is not one; the message never holds it)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        raise ValueError(f"a webhook secret is {SECRET_PREFIX} and base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret holds 24 to 64 bytes")
    return key


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The Standard Webhooks `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of
    `{id}.{timestamp}.{body}` under the secret's key."""
    mac = hmac.new(secret_key(secret), f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def webhook_url_problem(url: object) -> str:
    """Why `url` cannot be a webhook endpoint ("" when it can): an http(s) URL with a host."""
    if not isinstance(url, str):
        return f"must be a string, got {type(url).__name__}"
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in url):
        return "holds whitespace or a control character"
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return "is not a URL"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an http:// or https:// URL with a host"
    return ""


def webhook_events_problem(events: object) -> str:
    """Why `events` is not a list of webhook event types ("" when it is)."""
    if not isinstance(events, (list, tuple)) or not events or not all(isinstance(e, str) for e in events):
        return f"must be a non-empty list of event types ({', '.join(ALL_EVENTS)})"
    unknown = sorted(set(events) - set(ALL_EVENTS))
    if unknown:
        return f"has unknown event types {[u[:40] for u in unknown[:4]]}; known: {', '.join(ALL_EVENTS)}"
    return ""
