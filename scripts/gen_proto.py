"""Regenerates the code made from proto/: the Python stubs in clients/python, README.md's error
table (scripts/gen_error_table.py) and the TypeScript client's generated code (buf generate, see
clients/typescript/buf.gen.yaml).

Uses grpc_tools.protoc with the mypy-protobuf plugins so the stubs ship with .pyi
types. Only proto/batchgate is generated for Python: the vendored proto/google/rpc
messages come from googleapis-common-protos. `--check` generates into a scratch
folder and fails when the committed code differs, so stale generated code cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gen_error_table  # scripts/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
CLIENT_ROOT = ROOT / "clients" / "python"
TS_ROOT = ROOT / "clients" / "typescript"
TS_TEMPLATE = TS_ROOT / "buf.gen.yaml"
TS_GENERATED = Path("clients") / "typescript" / "src" / "gen"  # buf.gen.yaml's `out`, from ROOT
TS_PLUGIN = TS_ROOT / "node_modules" / ".bin" / "protoc-gen-es"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "batchgate").rglob("*.proto"))


def generate(out_dir: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT, env=env)


def generate_typescript(out_base: Path) -> None:
    """buf generate with clients/typescript/buf.gen.yaml, its output under `out_base`."""
    if not TS_PLUGIN.exists():
        sys.exit(f"{TS_PLUGIN} is missing: run `npm ci --prefix clients/typescript` (make does)")
    buf = Path(sys.executable).with_name("buf")
    subprocess.run([str(buf), "generate", "--template", str(TS_TEMPLATE.relative_to(ROOT)), "-o", str(out_base)],
                   check=True, cwd=ROOT)


def tree(base: Path) -> dict[Path, bytes]:
    return {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()} if base.exists() else {}


def check_typescript() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate_typescript(Path(tmp))
        want, have = tree(Path(tmp) / TS_GENERATED), tree(ROOT / TS_GENERATED)
    stale = sorted(str(TS_GENERATED / p) for p in set(want) | set(have) if want.get(p) != have.get(p))
    if stale:
        print("generated TypeScript is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated TypeScript is up to date")
    return 0


def generated_files(base: Path) -> set[Path]:
    return {
        p.relative_to(base)
        for p in base.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(CLIENT_ROOT)
        stale = sorted(str(p) for p in want ^ have)
        stale += sorted(
            str(p) for p in want & have if not filecmp.cmp(fresh / p, CLIENT_ROOT / p, shallow=False)
        )
    if stale:
        print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return check_typescript() or gen_error_table.main(["--check"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if clients/python is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    for rel in generated_files(CLIENT_ROOT):
        (CLIENT_ROOT / rel).unlink()
    generate(CLIENT_ROOT)
    for package_dir in {p.parent for p in generated_files(CLIENT_ROOT)}:
        init = CLIENT_ROOT / package_dir / "__init__.py"
        init.touch(exist_ok=True)
    generate_typescript(ROOT)
    return gen_error_table.main([])


if __name__ == "__main__":
    sys.exit(main())
