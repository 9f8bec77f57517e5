"""Unit tests for the streaming OpenAI batch input validator."""

from __future__ import annotations

import json
import random

import pytest

from batchgate_server.core.jsonl_validation import (
    MAX_NESTING,
    SUPPORTED_ENDPOINTS,
    JsonlValidator,
    LineProblem,
    ValidationResult,
)
from batchgate_server.domain.shards import MAX_FILE_GROUPS, MAX_GROUP_LINES, FileGroup

URL = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


def req(custom_id="r1", *, method="POST", url=URL, model=MODEL, body=None, drop=(), **extra):
    line = {
        "custom_id": custom_id,
        "method": method,
        "url": url,
        "body": body if body is not None else {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(extra)
    for key in drop:
        line.pop(key)
    return line


def jsonl(*lines, newline="\n", trailing=True) -> bytes:
    parts = [ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False) for ln in lines]
    text = newline.join(parts) + (newline if trailing else "")
    return text.encode("utf-8")


def validate(data: bytes, chunk_size: int | None = None, **kwargs) -> ValidationResult:
    v = JsonlValidator(**kwargs)
    if chunk_size is None:
        v.feed(data)
    else:
        for i in range(0, len(data), chunk_size):
            v.feed(data[i : i + chunk_size])
    return v.finish()


def codes(result: ValidationResult) -> list[tuple[int, str]]:
    return [(p.line, p.code) for p in result.problems]


def valid_file(n=3) -> bytes:
    return jsonl(*(req(f"r{i}") for i in range(1, n + 1)))


# --------------------------------------------------------------------------- valid


def test_valid_file_gives_count_endpoint_model():
    res = validate(valid_file(3))
    assert res.ok
    assert res.problems == [] and res.total_problems == 0
    assert (res.line_count, res.endpoint, res.model) == (3, URL, MODEL)


def test_every_supported_endpoint_is_accepted():
    assert "/v1/embeddings" in SUPPORTED_ENDPOINTS
    for url in SUPPORTED_ENDPOINTS:
        res = validate(jsonl(req("a", url=url), req("b", url=url)))
        assert res.ok, res.problems
        assert res.endpoint == url


def test_crlf_line_endings():
    res = validate(jsonl(req("a"), req("b"), req("c"), newline="\r\n"))
    assert res.ok, res.problems
    assert res.line_count == 3


def test_crlf_split_between_cr_and_lf():
    data = jsonl(req("a"), req("b"), newline="\r\n")
    cut = data.index(b"\r\n") + 1
    v = JsonlValidator()
    v.feed(data[:cut])
    v.feed(data[cut:])
    assert v.finish().ok


def test_trailing_newline_and_no_trailing_newline():
    with_nl = validate(jsonl(req("a"), req("b")))
    without = validate(jsonl(req("a"), req("b"), trailing=False))
    assert with_nl.ok and without.ok
    assert with_nl.line_count == without.line_count == 2


def test_blank_lines_at_end_of_file_are_ignored():
    res = validate(jsonl(req("a"), req("b")) + b"\n  \r\n\t\n")
    assert res.ok, res.problems
    assert res.line_count == 2


def test_whitespace_around_json_is_fine():
    res = validate(b'  ' + jsonl(req("a"), trailing=False) + b' \t\n')
    assert res.ok, res.problems


# --------------------------------------------------------------------------- one test per rule


def test_invalid_utf8_reports_the_line_of_the_bad_byte():
    data = jsonl(req("a"), req("b")) + b'{"custom_id": "\xff\xfe"}\n' + jsonl(req("d"))
    res = validate(data)
    assert codes(res) == [(3, "invalid_utf8")]
    assert res.line_count == 4


def test_invalid_utf8_surrogate_and_overlong_encodings():
    for bad in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xf5\x80\x80\x80"):
        data = jsonl(req("a")) + b'{"custom_id": "' + bad + b'"}\n'
        assert codes(validate(data)) == [(2, "invalid_utf8")], bad


def test_truncated_multibyte_character_at_end_of_file():
    data = jsonl(req("a")) + "é".encode()[:1]
    assert codes(validate(data)) == [(2, "invalid_utf8")]


def test_invalid_json_line():
    res = validate(jsonl(req("a"), '{"custom_id": "b", ', req("c")))
    assert codes(res) == [(2, "invalid_json_line")]
    assert res.line_count == 3


def test_json_value_that_is_not_an_object_is_invalid_json_line():
    for value in ("[1, 2]", '"text"', "42", "null", "true"):
        assert codes(validate(jsonl(req("a"), value))) == [(2, "invalid_json_line")], value


def test_trailing_garbage_and_nan_are_invalid_json_line():
    line = json.dumps(req("b"))
    for bad in (line + " x", line + line, '{"custom_id": NaN}', '{"a": Infinity}'):
        assert codes(validate(jsonl(req("a"), bad))) == [(2, "invalid_json_line")], bad


def test_object_spanning_two_lines_is_invalid():
    res = validate(jsonl(req("a"), '{"custom_id":', '"b"}'))
    assert codes(res) == [(2, "invalid_json_line"), (3, "invalid_json_line")]


def test_blank_line_in_the_middle_is_invalid_json_line():
    res = validate(jsonl(req("a"), "", "   ", req("b")))
    assert codes(res) == [(2, "invalid_json_line"), (3, "invalid_json_line")]
    assert res.line_count == 2


def test_non_json_line_reports_only_invalid_json_line():
    res = validate(jsonl(req("a"), "this is not json", req("c")))
    assert codes(res) == [(2, "invalid_json_line")]


def test_missing_custom_id():
    res = validate(jsonl(req("a"), req(drop=("custom_id",)), req(""), req(17)))
    assert codes(res) == [(2, "missing_custom_id"), (3, "missing_custom_id"), (4, "missing_custom_id")]
    assert "custom_id" in res.problems[0].message


def test_duplicate_custom_id_names_first_line():
    res = validate(jsonl(req("a"), req("dup"), req("c"), req("dup")))
    assert codes(res) == [(4, "duplicate_custom_id")]
    assert "line 2" in res.problems[0].message
    assert "dup" in res.problems[0].message


def test_invalid_method():
    res = validate(jsonl(req("a"), req("b", method="GET"), req("c", drop=("method",)), req("d", method="post")))
    assert codes(res) == [(2, "invalid_method"), (3, "invalid_method"), (4, "invalid_method")]
    assert "method" in res.problems[0].message


def test_unsupported_url():
    res = validate(jsonl(req("a"), req("b", url="/v1/images/generations"), req("c", drop=("url",)), req("d", url=3)))
    assert codes(res) == [(2, "unsupported_url"), (3, "unsupported_url"), (4, "unsupported_url")]
    assert "url" in res.problems[0].message


def test_supported_endpoints_can_be_configured():
    data = jsonl(req("a", url="/chat/completions"))
    assert codes(validate(data)) == [(1, "unsupported_url")]
    assert validate(data, supported_endpoints=("/chat/completions",)).ok


def test_unsupported_url_anywhere_in_a_mixed_file():
    res = validate(jsonl(req("a"), req("b", url="/v1/embeddings"), req("c", url="/v1/bad"), req("d", drop=("url",))))
    assert codes(res) == [(3, "unsupported_url"), (4, "unsupported_url")]
    assert "'/v1/bad' is not a supported endpoint" in res.problems[0].message
    assert res.problems[1].message == "url is missing"


def test_invalid_body():
    res = validate(jsonl(req("a"), req("b", drop=("body",)), req("c", body=[1]), req("d", body="x")))
    assert codes(res) == [(2, "invalid_body"), (3, "invalid_body"), (4, "invalid_body")]
    assert "body" in res.problems[0].message


def test_missing_model():
    res = validate(
        jsonl(req("a"), req("b", body={"messages": []}), req("c", model=""), req("d", model=None), req("e", model=4))
    )
    assert codes(res) == [(i, "missing_model") for i in (2, 3, 4, 5)]
    assert "model" in res.problems[0].message


# --------------------------------------------------------------------------- groups (mixed files)


def test_one_group_keeps_endpoint_and_model():
    res = validate(valid_file(3))
    assert res.ok and res.endpoint == URL and res.model == MODEL
    assert res.groups == [FileGroup(URL, MODEL, 3, [1, 2, 3])]


def test_mixed_urls_and_models_are_counted_by_group_in_order_of_first_line():
    lines = [req("a"), req("b", url="/v1/embeddings", model="emb"), req("c", model="gpt-4o"), req("d"),
             req("e", url="/v1/embeddings", model="emb"), req("f", url="/v1/embeddings", model=MODEL), req("g")]
    res = validate(jsonl(*lines))
    assert res.ok and res.line_count == 7
    assert res.endpoint == "" and res.model == ""
    assert res.groups == [FileGroup(URL, MODEL, 3, [1, 4, 7]), FileGroup("/v1/embeddings", "emb", 2, [2, 5]),
                          FileGroup(URL, "gpt-4o", 1, [3]), FileGroup("/v1/embeddings", MODEL, 1, [6])]


def test_same_model_on_two_urls_is_mixed():
    res = validate(jsonl(req("a"), req("b", url="/v1/completions")))
    assert res.ok and res.endpoint == "" and res.model == ""
    assert [(g.endpoint, g.model, g.count) for g in res.groups] == [(URL, MODEL, 1), ("/v1/completions", MODEL, 1)]


def test_group_line_numbers_are_physical_and_bounded():
    # Blank lines at the end, CRLF endings, interleaved groups: first_lines are the file's line numbers.
    lines = [req(f"r{i}", model=MODEL if i % 3 else "other") for i in range(1, 61)]
    res = validate(jsonl(*lines, newline="\r\n") + b"\r\n\n")
    assert res.ok
    main, other = res.groups
    assert (main.count, other.count) == (40, 20)
    assert len(main.first_lines) == len(other.first_lines) == MAX_GROUP_LINES
    assert main.first_lines == [1, 2, 4, 5, 7, 8, 10, 11, 13, 14]
    assert other.first_lines == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def test_invalid_lines_count_in_no_group():
    res = validate(jsonl(req("a"), req("b", url="/v1/bad", model="x"), req("c", model=""), "nope",
                         req("d", model="y", method="GET"), req("e", model="z" * 300)))
    assert codes(res) == [(2, "unsupported_url"), (3, "missing_model"), (4, "invalid_json_line"),
                          (5, "invalid_method"), (6, "model_too_long")]
    # A line with a problem of its own but a valid url and model (line 5) still counts in its group:
    # the groups describe the file only when it is valid.
    assert [(g.model, g.count) for g in res.groups] == [(MODEL, 1), ("y", 1)]


def test_too_many_groups_names_the_first_line_past_the_limit():
    lines = [req(f"r{i}", model=f"m{i % (MAX_FILE_GROUPS + 2)}") for i in range(3 * (MAX_FILE_GROUPS + 2))]
    res = validate(jsonl(*lines))
    assert codes(res) == [(MAX_FILE_GROUPS + 1, "too_many_groups")]
    assert f"starts group {MAX_FILE_GROUPS + 1}" in res.problems[0].message
    assert f"at most {MAX_FILE_GROUPS}" in res.problems[0].message
    assert len(res.groups) == MAX_FILE_GROUPS
    assert res.groups[0] == FileGroup(URL, "m0", 3, [1, MAX_FILE_GROUPS + 3, 2 * MAX_FILE_GROUPS + 5])


def test_exactly_max_file_groups_is_fine():
    res = validate(jsonl(*(req(f"r{i}", model=f"m{i}") for i in range(MAX_FILE_GROUPS))))
    assert res.ok and len(res.groups) == MAX_FILE_GROUPS


def test_groups_survive_any_chunking_and_pickling():
    import pickle

    lines = [req(f"r{i}", url=SUPPORTED_ENDPOINTS[i % 2], model=("ä", "東京", "🚀")[i % 3]) for i in range(40)]
    data = jsonl(*lines)
    expected = validate(data)
    assert len(expected.groups) == 6 and sum(g.count for g in expected.groups) == 40
    for cut in range(0, len(data) + 1, 7):
        v = JsonlValidator()
        v.feed(data[:cut])
        v.feed(data[cut:])
        assert v.finish() == expected, cut
    assert validate(data, chunk_size=1) == expected
    assert pickle.loads(pickle.dumps(expected)) == expected


def test_empty_file():
    for data in (b"", b"\n", b"\r\n", b"  \n\n\t\n"):
        res = validate(data)
        assert codes(res) == [(0, "empty_file")], data
        assert res.line_count == 0 and res.endpoint == "" and res.model == ""
    v = JsonlValidator()
    assert codes(v.finish()) == [(0, "empty_file")]


def test_too_many_tasks_reported_once_and_lines_still_counted():
    res = validate(valid_file(6), max_lines=3)
    assert codes(res) == [(4, "too_many_tasks")]
    assert res.line_count == 6


def test_too_many_tasks_lines_after_the_limit_are_only_counted():
    data = jsonl(req("a"), "bad", req("c"), req("a"), "also bad", "", req("x", model="other"), trailing=False)
    expected = validate(data, max_lines=2)
    assert codes(expected) == [(2, "invalid_json_line"), (3, "too_many_tasks")]
    assert expected.line_count == 7
    assert expected.total_problems == 2
    for cut in range(len(data) + 1):
        v = JsonlValidator(max_lines=2)
        v.feed(data[:cut])
        v.feed(data[cut:])
        assert v.finish() == expected, cut
    assert validate(data, chunk_size=1, max_lines=2) == expected


def test_too_many_tasks_flood_of_tiny_lines_is_fast():
    import time

    data = b"{}\n" * 2_000_000  # 6 MB; validated line by line this takes seconds
    t0 = time.perf_counter()
    res = validate(data, chunk_size=256 * 1024, max_lines=1000)
    assert time.perf_counter() - t0 < 1.0
    assert res.line_count == 2_000_000
    assert res.total_problems == 4 * 1000 + 1  # 4 per "{}" line, then too_many_tasks
    assert len(res.problems) == 20


def test_file_too_large():
    line = jsonl(req("abc"))  # every line the same length
    size = len(line)
    data = line * 5
    v = JsonlValidator(max_bytes=2 * size + 5)
    v.feed(data[:size])
    assert not v.too_large
    v.feed(data[size:])
    assert v.too_large
    v.feed(data)  # callers may keep feeding; nothing more is validated
    res = v.finish()
    # lines 1-2 were validated (line 2 duplicates line 1), the limit is crossed on line 3
    assert codes(res) == [(2, "duplicate_custom_id"), (3, "file_too_large")]
    assert res.line_count == 2


def test_file_too_large_limit_on_line_boundary_and_exact_size():
    data = valid_file(3)
    assert validate(data, max_bytes=len(data)).ok
    first = len(jsonl(req("r1")))
    res = validate(data, max_bytes=first, chunk_size=7)
    assert codes(res) == [(2, "file_too_large")]
    assert res.line_count == 1


def test_file_too_large_in_small_chunks_matches_one_chunk():
    data = valid_file(6)
    for limit in range(1, len(data)):
        expected = codes(validate(data, max_bytes=limit))
        assert expected[-1][1] == "file_too_large"
        assert codes(validate(data, max_bytes=limit, chunk_size=5)) == expected, limit


# --------------------------------------------------------------------------- several problems, limits


def test_line_with_several_problems_reports_each():
    res = validate(jsonl(req("a"), {"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {"model": "x"}}))
    assert codes(res) == [(2, "duplicate_custom_id"), (2, "invalid_method")]
    res = validate(jsonl(req("a"), {"custom_id": "a", "method": "GET", "url": "/v1/x", "body": {"model": ""}}))
    assert codes(res) == [(2, "duplicate_custom_id"), (2, "invalid_method"), (2, "unsupported_url"),
                          (2, "missing_model")]
    res = validate(jsonl({"foo": 1}))
    assert codes(res) == [(1, "missing_custom_id"), (1, "invalid_method"), (1, "unsupported_url"), (1, "invalid_body")]


def test_25_bad_lines_report_20_and_count_25():
    lines = [req("ok")] + ["not json"] * 25 + [req("ok2")]
    res = validate(jsonl(*lines))
    assert len(res.problems) == 20
    assert res.total_problems == 25
    assert not res.ok
    assert [p.line for p in res.problems] == list(range(2, 22))
    assert res.line_count == 27


def test_max_reported_is_configurable_and_blank_runs_are_counted():
    res = validate(jsonl(req("a"), *([""] * 30), req("b")), max_reported=5)
    assert [p.line for p in res.problems] == [2, 3, 4, 5, 6]
    assert res.total_problems == 30


def test_problems_are_in_line_order():
    data = jsonl(req("a"), "", req("a"), "x", req("c", method="GET")) + b"\xff\n" + jsonl(req("d", model=""))
    res = validate(data)
    assert codes(res) == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_json_line"),
        (5, "invalid_method"),
        (6, "invalid_utf8"),
        (7, "missing_model"),
    ]
    assert all(isinstance(p, LineProblem) for p in res.problems)


# --------------------------------------------------------------------------- chunking


def _mixed_file() -> bytes:
    """Valid and invalid lines with 2-, 3- and 4-byte UTF-8 characters."""
    return (
        jsonl(
            req("é-1", body={"model": MODEL, "messages": [{"role": "user", "content": "café 東京 🚀"}]}),
            req("東-2"),
            req("é-1"),
            "",
            req("🚀", model="ünïcode"),
            '{"custom_id": "x", "body": ',
        )
        + b'{"custom_id": "\xe6\x9d"}\n'  # truncated 3-byte character: invalid UTF-8
        + jsonl(req("last", url="/v1/embeddings"), newline="\r\n", trailing=False)
    )


def test_chunk_boundary_at_every_byte_offset_gives_same_result():
    for data in (_mixed_file(), jsonl(req("ä"), req("東京"), req("🚀🚀"), newline="\r\n")):
        expected = validate(data)
        for cut in range(len(data) + 1):
            v = JsonlValidator()
            v.feed(data[:cut])
            v.feed(data[cut:])
            assert v.finish() == expected, cut


def test_one_byte_chunks_and_random_chunks_give_same_result():
    data = _mixed_file()
    expected = validate(data)
    assert codes(expected) == [
        (3, "duplicate_custom_id"),
        (4, "invalid_json_line"),
        (6, "invalid_json_line"),
        (7, "invalid_utf8"),
    ]
    assert [(g.endpoint, g.model, g.first_lines) for g in expected.groups] == [
        (URL, MODEL, [1, 2, 3]), (URL, "ünïcode", [5]), ("/v1/embeddings", MODEL, [8])]
    assert validate(data, chunk_size=1) == expected
    rng = random.Random(1)
    for _ in range(200):
        v = JsonlValidator()
        i = 0
        while i < len(data):
            j = i + rng.randint(0, 40)
            v.feed(data[i:j])
            i = j
        assert v.finish() == expected


# --------------------------------------------------------------------------- robustness


def test_feed_never_raises_on_garbage():
    rng = random.Random(7)
    for _ in range(50):
        blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
        v = JsonlValidator()
        v.feed(blob)
        res = v.finish()
        assert res.total_problems >= 1


def test_deeply_nested_json_does_not_raise():
    res = validate(jsonl(req("a"), "[" * 200_000 + "]" * 200_000))
    assert codes(res) == [(2, "invalid_json_line")]


def test_nesting_is_limited_to_max_nesting_levels_whatever_the_interpreter_allows():
    # The line's own object is level 1, body level 2: "x" holds the rest.
    def nested(depth: int) -> str:
        inner = "[" * (depth - 2) + "]" * (depth - 2)
        return f'{{"custom_id": "c{depth}", {HEAD}, "body": {{"model": "m", "x": {inner}}}}}'
    res = validate(jsonl(nested(MAX_NESTING), nested(MAX_NESTING + 1), nested(990)))
    assert codes(res) == [(2, "invalid_json_line"), (3, "invalid_json_line")]
    assert res.problems[0].message == (
        f"line is nested too deeply: its arrays and objects nest more than {MAX_NESTING} levels deep"
        f" (at most {MAX_NESTING} are allowed)")


def test_bytearray_and_memoryview_chunks():
    data = valid_file(2)
    v = JsonlValidator()
    v.feed(bytearray(data[:10]))
    v.feed(memoryview(data)[10:])
    assert v.finish().ok


def test_finish_is_idempotent():
    v = JsonlValidator()
    v.feed(valid_file(2))
    first = v.finish()
    assert v.finish() is first


# ------------------------------------------------- unencodable strings, limits, BOM


GOOD = '{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}'


def _raw(custom_id='"c"', model='"m"', extra="") -> str:
    """A request line written by hand, so JSON escapes stay exactly as given."""
    return ('{"custom_id": %s, "method": "POST", "url": "/v1/chat/completions", "body": {"model": %s%s}}'
            % (custom_id, model, extra))


LONE_SURROGATES = {
    "high_in_custom_id": (_raw(custom_id='"a\\ud800"'), "custom_id"),
    "low_in_custom_id": (_raw(custom_id='"\\udc00b"'), "custom_id"),
    "reversed_pair": (_raw(custom_id='"\\udc00\\ud800"'), "custom_id"),
    "uppercase_hex_in_model": (_raw(model='"\\uD800"'), "body.model"),
    "nested_string": (_raw(extra=', "messages": [{"role": "user", "content": "x\\udfff"}]'),
                      "body.messages[0].content"),
    "in_a_key": (_raw(extra=', "k\\ud800": 1'), "a key in 'body'"),
    "in_a_top_level_key": ('{"\\udc00": 1, ' + _raw()[1:], "a top-level key"),
    "high_then_not_low": (_raw(extra=', "s": "\\ud83d\\u0041"'), "body.s"),
}


@pytest.mark.parametrize("case", sorted(LONE_SURROGATES))
def test_lone_surrogate_escapes_are_rejected_with_the_line_and_where(case):
    line, where = LONE_SURROGATES[case]
    named = where if where.startswith("a ") else f"the string at {where!r}"
    for chunk_size in (None, 3):
        res = validate((GOOD + "\n" + line + "\n").encode(), chunk_size=chunk_size)
        assert codes(res) == [(2, "unpaired_surrogate")]
        assert res.problems[0].message.startswith(named + " holds") and "UTF-8" in res.problems[0].message
        res.problems[0].message.encode("utf-8")  # the message itself is encodable


def test_paired_surrogates_and_escaped_backslashes_are_fine():
    lines = [_raw(custom_id='"smile \\ud83d\\ude00"'),  # one character, escaped as a pair
             _raw(custom_id='"\\\\ud800"'),  # a backslash, then the letters "ud800"
             _raw(custom_id='"\\u00e9\\uD83D\\uDE00"')]
    res = validate("\n".join(lines).encode())
    assert res.ok, res.problems


def test_custom_id_and_model_lengths_are_bounded():
    at_limit = jsonl(req("c" * 512, model="m" * 256))
    assert validate(at_limit).ok
    res = validate(jsonl(req("ok"), req("c" * 513), req("x", model="m" * 257)), chunk_size=100)
    assert codes(res) == [(2, "custom_id_too_long"), (3, "model_too_long")]
    assert "513 characters" in res.problems[0].message and "512" in res.problems[0].message
    assert "257 characters" in res.problems[1].message and "256" in res.problems[1].message
    # Characters, not bytes: 256 four-byte characters are fine.
    assert validate(jsonl(req("é" * 512, model="😀" * 256))).ok


def test_a_huge_model_gets_a_short_problem_and_is_not_kept():
    res = validate(jsonl(req("a", model="m" * 4_500_000), req("b", model="m" * 4_500_000)), chunk_size=1 << 20)
    assert codes(res) == [(1, "model_too_long"), (2, "model_too_long")]
    assert res.model == "" and all(len(p.message) < 200 for p in res.problems)


def test_a_byte_order_mark_is_named():
    res = validate(b"\xef\xbb\xbf" + valid_file(2))
    assert codes(res) == [(1, "invalid_json_line")]
    message = res.problems[0].message
    assert "byte order mark" in message and "without a BOM" in message and "column 1" not in message


def test_where_a_deep_surrogate_sits_is_found_without_building_every_path():
    """Paths are only spelled out for the string that is reported: a deeply nested line with long
    keys costs one walk, not a copy of every ancestor's path per node."""
    import time

    key = "k" * 400_000  # 100 levels (under MAX_NESTING) of 400,000-character keys
    line = '{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "x": '
    line += ('{"%s": ' % key) * 100 + '"\\ud800"' + "}" * 100 + "}}"
    started = time.process_time()
    res = validate(line.encode())
    # CPU time, not wall time: these 40 MB took 9 s of CPU when every node spelt its path, 0.2 s now.
    assert time.process_time() - started < 3
    assert codes(res) == [(1, "unpaired_surrogate")]
    assert res.problems[0].message.startswith("the string at 'body.x.kkkkk")
    assert len(res.problems[0].message) < 400


# The fast path (msgspec, typed) and the stdlib decoder differ on these; each must get the
# stdlib's verdict, which is what the validator promised before the fast path existed.
HEAD = '"method": "POST", "url": "/v1/chat/completions"'


@pytest.mark.parametrize("line", [
    '{"custom_id": "a", %s, "body": {"model": null, "model": "m"}}' % HEAD,  # last key wins, typed field refuses null
    '{"custom_id": "a", %s, "body": {"model": "m", "n": 123456789012345678901234567890}}' % HEAD,  # past 64 bits
    '{"custom_id": "a", %s, "body": {"model": "m", "t": 1e400}}' % HEAD,  # a float json reads as inf
    '{"custom\\u005fid": "a", %s, "body": {"model": "m"}}' % HEAD,  # an escaped key
    '{"custom_id": 7, "custom_id": "a", %s, "body": {"model": "m"}}' % HEAD,
], ids=["null-then-model", "big-int", "huge-float", "escaped-key", "wrong-type-then-right"])
def test_lines_the_stdlib_accepts_stay_accepted(line):
    assert validate(line.encode()).ok


def test_duplicate_keys_are_read_as_the_last_one():
    res = validate(jsonl('{"custom_id": "a", "custom_id": "b", %s, "body": {"model": "m"}}' % HEAD,
                         '{"custom_id": "b", %s, "body": {"model": "m"}}' % HEAD))
    assert codes(res) == [(2, "duplicate_custom_id")]
    assert res.problems[0].message == "custom_id 'b' is a duplicate of line 1"


def test_bad_utf8_in_a_field_no_rule_reads_is_found():
    line = b'{"custom_id": "a", ' + HEAD.encode() + b', "body": {"model": "m", "x": "\xc0\xaf"}}\n'
    assert codes(validate(line)) == [(1, "invalid_utf8")]


def test_an_unpaired_surrogate_in_a_skipped_key_is_found():
    res = validate(('{"custom_id": "a", %s, "body": {"model": "m", "\\udc00": 1}}' % HEAD).encode())
    assert codes(res) == [(1, "unpaired_surrogate")]
    assert res.problems[0].message.startswith("a key in 'body' holds")


def test_many_ids_and_their_duplicates_are_all_found():
    # Ids spread over every bucket of the compact index, some repeated far apart.
    ids = [f"id-{i}" for i in range(30_000)]
    lines = [req(i) for i in ids] + [req(ids[k]) for k in (29_999, 0, 12_345)]
    res = validate(jsonl(*lines), max_lines=50_000)
    assert codes(res) == [(30_001, "duplicate_custom_id"), (30_002, "duplicate_custom_id"),
                          (30_003, "duplicate_custom_id")]
    assert [p.message for p in res.problems] == [
        "custom_id 'id-29999' is a duplicate of line 30000", "custom_id 'id-0' is a duplicate of line 1",
        "custom_id 'id-12345' is a duplicate of line 12346"]
