"""The TypeScript client's npm dependencies and build, for the tests that need them.

`make test` runs `npm ci` first (see the Makefile); a test run without it installs them here, from
clients/typescript/package-lock.json, so that the tests never run against a stale install.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

TS_ROOT = Path(__file__).resolve().parent.parent / "clients" / "typescript"
LOCK = TS_ROOT / "package-lock.json"
INSTALLED = TS_ROOT / "node_modules" / ".package-lock.json"  # what npm last installed


def ensure_dependencies() -> None:
    assert shutil.which("npm") and shutil.which("node"), "node and npm are needed (node 18 or later)"
    if not INSTALLED.exists() or INSTALLED.stat().st_mtime < LOCK.stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=TS_ROOT, check=True, capture_output=True)


def build() -> Path:
    """Compiles src/ and test/ with tsc; the folder of the built JavaScript."""
    ensure_dependencies()
    done = subprocess.run(["npm", "run", "--silent", "build"], cwd=TS_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return TS_ROOT / "dist"
