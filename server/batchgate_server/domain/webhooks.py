"""Webhook endpoints and the outbox of events waiting to be delivered to them.

An event is OpenAI's webhook event shape (`{"id": "evt_…", "object": "event", "created_at",
"type", "data": {"id": batch_id}}`), signed as the Standard Webhooks specification says. Its body
is fixed when the batch ends, so every retry sends the same bytes under the same webhook-id.
"""

from __future__ import annotations

import base64
import json
import secrets
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
