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


def test_the_protos_build_from_the_repository_alone(tmp_path):
    """README "Other languages": proto/ holds everything a client needs -- batchgate.v1 and the google.rpc
    messages its errors use -- so protoc needs no include but its own well-known types. (The TypeScript
    client is generated from the same files by buf; this is protoc's language-neutral descriptor set.)"""
    from google.protobuf import descriptor_pb2

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    out = tmp_path / "contract.binpb"
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--descriptor_set_out={out}",
                             *protos], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto", "google/rpc/code.proto",
            "batchgate/v1/error_reason.proto", "batchgate/v1/file.proto"} <= set(files)
    assert "ErrorInfo" in [m.name for m in files["google/rpc/error_details.proto"].message_type]
    assert [e.name for e in files["batchgate/v1/error_reason.proto"].enum_type] == ["ErrorReason"]
