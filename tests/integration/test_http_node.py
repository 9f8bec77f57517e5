"""The official openai npm package (tests/node, installed by `make test` with npm ci) drives the HTTP
API from node: files, batches, pagination, cancel and the error classes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import serving
from tests.integration.test_http_api import slow_model_config

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_openai_npm_package_drives_the_http_api(tmp_path):
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), f"run `npm ci` in {NODE_DIR} (make test does)"
    config = slow_model_config(tmp_path)
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", config_file=config) as h:
        # The server runs on this event loop: the script must run beside it, not block it.
        proc = await asyncio.create_subprocess_exec(
            "node", str(NODE_DIR / "openai_sdk.mjs"), cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={
                **os.environ, "BATCHGATE_BASE_URL": f"http://127.0.0.1:{h.server.http_port}/v1",
                "BATCHGATE_API_KEY": h.alice.api_key, "BATCHGATE_SLOW_MODEL": "slow"})
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        seen = json.loads(out)
    assert seen == {
        "created": [["file", "batch", "processed", True]] * 3,
        "retrieved": "a.jsonl",
        "listed_newest_first": True,
        "content_matches": True,
        "batch": ["batch", "validating", "node"],
        "batch_retrieved": True,
        "batch_listed": True,
        "cancelled": seen["cancelled"] if seen["cancelled"] in ("cancelling", "cancelled") else "not cancelled",
        "deleted": [True, True],
        "not_found": [True, 404, "file_not_found", True],
        "invalid": [True, 400, "invalid_batch_file", "line 1", 1],
        "unauthenticated": [True, 401, "invalid_api_key"],
    }
