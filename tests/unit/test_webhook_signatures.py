"""Webhook signatures as Standard Webhooks defines them: what the deliverer sends verifies with
the independent `standardwebhooks` package and with README's by-hand example, taken as written;
tampering with the id, timestamp, body or secret fails both."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from batchgate_server.domain.webhooks import event_body, new_webhook_secret, secret_key, signature
from tests.readme import section


def readme_verify():
    text = section("### Webhooks").split("\n## ", 1)[0]  # up to the next section of any level above
    [block] = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README's example, as a user runs it)
    return namespace["verify"]


def signed(secret: str, body: str, msg_id: str = "evt_1", timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, msg_id, timestamp, body)}


def test_signatures_verify_with_the_library_and_the_readme_example():
    secret = new_webhook_secret()
    body = event_body("evt_1", "batch.completed", "batch_1", int(time.time()))
    headers = signed(secret, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers)["data"] == {"id": "batch_1"}
    assert readme_verify()(secret, headers, body.encode())["type"] == "batch.completed"


@pytest.mark.parametrize("tamper", ["id", "timestamp", "body", "secret", "stale"])
def test_any_tampering_fails_both_checks(tamper):
    secret, other = new_webhook_secret(), new_webhook_secret()
    body = event_body("evt_1", "batch.failed", "batch_1", int(time.time()))
    headers = signed(other if tamper == "secret" else secret, body,
                     timestamp=int(time.time()) - 3600 if tamper == "stale" else None)
    if tamper == "id":
        headers["webhook-id"] = "evt_2"
    if tamper == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + 1)
    if tamper == "body":
        body = body.replace("failed", "completed")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)
    verify = readme_verify()
    with pytest.raises(ValueError, match="bad signature|stale"):
        verify(secret, headers, body.encode())


@pytest.mark.parametrize("bad", ["", "whsec_", "sk_live_abc", "whsec_!!!!", "whsec_" + base64.b64encode(b"short").decode(),
                                 "whsec_" + base64.b64encode(b"x" * 65).decode()])
def test_a_malformed_secret_is_refused_without_echoing_it(bad):
    with pytest.raises(ValueError) as err:
        secret_key(bad)
    assert bad.removeprefix("whsec_") not in str(err.value) or bad in ("", "whsec_")
