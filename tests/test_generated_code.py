"""The committed generated code is exactly what `make gen` produces from proto/: the Python stubs in
clients/python, the TypeScript in clients/typescript/src/gen and README.md's error table."""

import subprocess
import sys
from pathlib import Path

from tests.typescript_build import ensure_dependencies

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh():
    ensure_dependencies()  # buf runs the TypeScript plug-in from clients/typescript/node_modules
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
