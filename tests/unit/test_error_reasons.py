"""The error reasons of proto/batchgate/v1/error_reason.proto are every reason the server raises.

Statically here: tests/server_reasons.py reads the server's code, and the reasons the case tables
expect are checked against the enum. Dynamically in tests/integration/test_hostile_inputs.py, which
checks every ErrorInfo its cases get against the enum and the gRPC code documented for it.
"""

import grpc
import pytest

from batchgate import ErrorReason, InvalidArgumentError
from batchgate.v1 import error_reason_pb2
from batchgate_server.core import jsonl_validation
from tests.server_reasons import ROOT, documented, scan

DOCUMENTED = documented()


def test_every_reason_the_server_raises_is_in_the_enum():
    found = scan()
    assert not found.unresolved, f"reasons the scan cannot read (use a literal or extend it): {found.unresolved}"
    missing = {reason: where for reason, where in found.reasons.items() if reason not in DOCUMENTED}
    assert not missing, f"add these to proto/batchgate/v1/error_reason.proto: {missing}"


# A reason is never removed from the enum (clients may know its number); one the server stopped
# raising says so at the start of its comment.
RETIRED = {name for name, reason in DOCUMENTED.items() if reason.when.startswith("No longer raised")}


def test_every_documented_reason_is_raised_by_the_server():
    stale = set(DOCUMENTED) - set(scan().reasons) - RETIRED
    assert not stale, f"error_reason.proto lists reasons the server never raises: {sorted(stale)}"


def test_a_retired_reason_is_raised_nowhere():
    raised = RETIRED & set(scan().reasons)
    assert not raised, f"these reasons are documented as no longer raised: {sorted(raised)}"


def test_the_scan_finds_reasons_however_they_are_passed():
    # One of each: an ApiError subclass, a helper's positional reason, UnsupportedRequest's keyword and
    # its default, not_found's kind. A scan that stopped seeing one of them would pass the tests above.
    found = scan().reasons
    assert {"MISSING_API_KEY", "INVALID_FILENAME", "PROVIDER_NOT_CONFIGURED", "UNSUPPORTED_ENDPOINT",
            "FILE_NOT_FOUND", "BATCH_NOT_FOUND", "STORAGE_FULL"} <= set(found)
    assert any("executor/provider.py" in where for where in found["UNSUPPORTED_ENDPOINT"]), "the default reason"


def test_the_proto_documents_each_reason_and_the_enum_matches_it():
    values = {v.name: v.number for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values}
    assert values.pop("ERROR_REASON_UNSPECIFIED") == 0
    assert values == {name: reason.number for name, reason in DOCUMENTED.items()}
    assert len(set(values.values())) == len(values)
    for reason in DOCUMENTED.values():
        assert reason.code in grpc.StatusCode.__members__, reason
        assert reason.when and reason.todo, reason


def test_invalid_batch_file_lists_every_problem_code_of_the_validator():
    codes = {value for name, value in vars(jsonl_validation).items()
             if name.isupper() and isinstance(value, str) and value.islower() and "_" in value}
    assert codes, "the validator's problem codes are its lower-case string constants"
    text = DOCUMENTED["INVALID_BATCH_FILE"].when.partition("problem code:")[2].partition(" Metadata")[0]
    listed = {word.strip("`,.") for word in text.split() if word.startswith("`") and word.strip("`,.").islower()}
    assert listed == codes


@pytest.mark.parametrize("table", ["test_hostile_inputs", "test_api_surfaces"])
def test_the_case_tables_expect_only_documented_reasons_with_their_codes(table):
    cases = __import__(f"tests.integration.{table}", fromlist=["CASES"]).CASES
    expected = {case.reason for case in cases if case.reason}
    assert expected - set(DOCUMENTED) == set()
    for case in cases:
        if case.reason:
            assert DOCUMENTED[case.reason].code == case.code.name, case.name


@pytest.mark.parametrize("reason", list(DOCUMENTED))
def test_the_python_client_knows_every_reason(reason):
    err = InvalidArgumentError("m", reason=reason)
    assert err.reason == reason and err.reason_enum is ErrorReason[reason] and err.reason_enum == reason
    assert err.reason_enum.number == DOCUMENTED[reason].number


def test_a_reason_the_client_does_not_know_stays_a_string():
    err = InvalidArgumentError("m", reason="SOMETHING_NEWER")
    assert err.reason == "SOMETHING_NEWER" and err.reason_enum is None
    assert InvalidArgumentError("m").reason_enum is None


def test_the_readme_table_is_the_proto_and_a_new_reason_makes_it_stale():
    gen_error_table = __import__("gen_error_table")  # loaded by documented()
    readme = (ROOT / "README.md").read_text()
    reasons = gen_error_table.reasons()
    assert gen_error_table.render(readme, reasons) == readme, "run `make gen`"
    body, _, end = gen_error_table.PROTO.read_text().rpartition("}")  # the enum's end
    added = gen_error_table.reasons(body + "  // NOT_FOUND. A test reason. Do: nothing.\n  TEST_REASON = 999;\n}" + end)
    assert added[-1].name == "TEST_REASON" and gen_error_table.render(readme, added) != readme
