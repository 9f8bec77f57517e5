"""The retention sweep deletes only keys shaped like the ones batchgate stages."""

import pytest

from batchgate_server.providers.staged import STAGED_KEY


@pytest.mark.parametrize("key", [
    "batchgate/batch_0a1b/input.jsonl",  # Vertex AI input
    "batchgate/batch_0a1b/input/batch_0a1b.jsonl",  # Bedrock input
    "batchgate/batch_0a1b/output/prediction-model-2026-12-01T10:00:00Z/predictions.jsonl",
    "batchgate/batch_0a1b/output/0a1b2c/manifest.json.out",
])
def test_staged_keys_name_their_batch(key):
    m = STAGED_KEY.match(key, len("batchgate/"))
    assert m and m.group(1) == "batch_0a1b"


@pytest.mark.parametrize("key", [
    "batchgate/notes.txt",
    "batchgate/batch_0a1b",
    "batchgate/batch_0a1b/input.jsonl.bak",
    "batchgate/batch_0a1b/other/file",
    "batchgate/team/batch_0a1b/input.jsonl",
    "batchgate/file-0a1b/input.jsonl",
])
def test_other_keys_are_never_swept(key):
    assert STAGED_KEY.match(key, len("batchgate/")) is None
