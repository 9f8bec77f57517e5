"""A key a provider echoes back in an error never reaches a caller or a log."""

import pytest

from batchgate_server.providers.openai_batch.client import Conn, scrub


@pytest.mark.parametrize("header, value", [
    ("Authorization", "Bearer sk-live-1234567890"),
    ("api-key", "azure-secret-0987"),
    ("x-api-key", "sk-ant-abcdef123456"),
])
def test_each_providers_credential_header_is_masked(header, value):
    secret = value.removeprefix("Bearer ")
    conn = Conn(label="P", base_url="http://x", headers={header: value, "anthropic-version": "2023-06-01"})
    text = f"Incorrect API key provided: {secret}. Version 2023-06-01 is fine."
    masked = scrub(text, conn)
    assert secret not in masked and "***" in masked
    assert "2023-06-01" in masked, "other headers are not credentials"
