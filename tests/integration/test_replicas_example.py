"""examples/replicas.sh as a user runs it: PostgreSQL, moto and three replicas started by the
script itself, one batch uploaded, created, watched and downloaded through three different
replicas (`--check`), and everything stopped and removed afterwards."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "replicas.sh"
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,  # starts a PostgreSQL of its own: once per run, not again on the postgres+s3 pass
    pytest.mark.skipif(not glob.glob("/usr/lib/postgresql/*/bin/initdb"), reason="no PostgreSQL server binaries"),
    pytest.mark.skipif(not (BIN / "moto_server").exists(), reason="no moto_server"),
]


def command_path(tmp_path: Path) -> str:
    """The virtualenv's commands first; `batchgate` as `python -m batchgate` where the client is
    importable but not installed as a command."""
    if not (BIN / "batchgate").exists():
        shim = tmp_path / "bin" / "batchgate"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m batchgate "$@"\n')
        shim.chmod(0o755)
        return f"{shim.parent}:{BIN}:{os.environ['PATH']}"
    return f"{BIN}:{os.environ['PATH']}"


def test_the_replicas_example_runs_a_batch_across_three_replicas(tmp_path):
    base = free_port()
    env = {**os.environ, "PATH": command_path(tmp_path), "PG_PORT": str(free_port()), "S3_PORT": str(free_port()),
           "BATCHGATE_PORT_BASE": str(base)}
    env.pop("BATCHGATE_DATABASE_URL", None)
    env.pop("BATCHGATE_BLOB_URL", None)
    before = set(glob.glob("/tmp/batchgate-replicas-*"))
    proc = subprocess.run(["bash", str(SCRIPT), "--check"], env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check passed" in proc.stdout and "50 requests answered across three replicas" in proc.stdout
    assert set(glob.glob("/tmp/batchgate-replicas-*")) <= before, "the script left its data behind"
