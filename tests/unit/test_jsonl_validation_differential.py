"""The validator's fast paths against its plain one, on hostile files.

The fast paths (a region's UTF-8 checked at once, its lines read by one msgspec ``decode_lines``
call, or line by line from bytes) must give exactly what the plain path gives: every line decoded
to str on its own (strict UTF-8, which names the bad byte) and read by the stdlib decoder. The plain
path is the same validator with its fast readers swapped for ones that refuse every line, and its
region UTF-8 check for one that decodes line by line, so the rules and messages stay the
validator's own while the machinery under test is taken away.
"""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from batchgate_server.core import jsonl_validation
from batchgate_server.core.jsonl_validation import JsonlValidator, ValidationResult

URL = "/v1/chat/completions"
BAD_BYTES = (0x80, 0xBF, 0xC0, 0xC1, 0xC3, 0xE0, 0xE6, 0xED, 0xF0, 0xF4, 0xF5, 0xFF)
TEXTS = ("hi", "café", "東京 数据", "🚀 launch", "quote \" and \\ slash", "tab\there", "}{", "} {")


def _line(rng: random.Random, n: int) -> str:
    body = {"model": rng.choice(("gpt-4o-mini", "gpt-4o", "é-model")),
            "messages": [{"role": "user", "content": rng.choice(TEXTS) * rng.randint(1, 4)}]}
    if rng.random() < 0.2:
        body["tools"] = [{"name": rng.choice(TEXTS), "n": rng.randint(-5, 5)}]
    line = {"custom_id": f"id-{rng.randint(0, n)}" if rng.random() < 0.1 else f"id-{n}-{rng.choice(TEXTS)}",
            "method": "POST" if rng.random() < 0.95 else "GET",
            "url": URL if rng.random() < 0.95 else "/v1/nope", "body": body}
    return json.dumps(line, ensure_ascii=rng.random() < 0.3)


def _hostile(rng: random.Random, line: str) -> bytes:
    """`line` as bytes, often spoiled in one of the ways a user's file can be."""
    raw = line.encode()
    kind = rng.randrange(16)
    at = rng.randrange(len(raw) + 1)
    if kind == 0:  # a bad byte anywhere: in a key, a skipped value, a field the rules read
        return raw[:at] + bytes([rng.choice(BAD_BYTES)]) + raw[at:]
    if kind == 1:  # a multi-byte character cut short (at the line's end too)
        return raw[:at] + "東".encode()[: rng.randint(1, 2)] + raw[at:]
    if kind == 2:  # a lone surrogate escape in a value or a key
        return line.replace(rng.choice(('"hi', '"role', '"content', '"n"')), '"\\udc01', 1).encode()
    if kind == 3:
        return b"\xef\xbb\xbf" + raw
    if kind == 4:  # blank or whitespace-only
        return rng.choice((b"", b" ", b"\r", b"\t ", b" \r"))
    if kind == 5:  # CRLF, or whitespace around the object
        return rng.choice((b"", b" ", b"\t")) + raw + rng.choice((b"\r", b" \r", b" "))
    if kind == 6:  # two objects on one line
        return raw + rng.choice((b"", b" ", b"\r", b"\t", b",")) + raw
    if kind == 7:  # an object split over two lines, at a comma (a place JSON allows whitespace)
        comma = raw.find(b", ", rng.randrange(len(raw)))
        return raw if comma < 0 else raw[: comma + 1] + rng.choice((b"\n", b"\r", b"\r\n")) + raw[comma + 2:]
    if kind == 8:  # cut short
        return raw[:at]
    if kind == 9:  # not an object, or not JSON
        return rng.choice((b"[1]", b'"x"', b"3", b"null", b"{", b"}", b"NaN", b"{} {}", b"{}"))
    if kind == 10:  # a type the typed reader refuses but json reads
        return line.replace('"model": "', '"model": 7, "model": "', 1).encode()
    if kind == 11:  # an object split over two lines before the body, so both halves start with "{"
        return raw.replace(b'"body": {', b'"body":\n{', 1)
    if kind == 12:  # nested about as deep as the limit, brackets in strings beside it
        depth = jsonl_validation.MAX_NESTING - 2 + rng.randint(-2, 2)  # the line and body are 2 levels
        inner = rng.choice(("[" * depth + "]" * depth, '{"a":' * depth + '"[{\\"["' + "}" * depth))
        return raw.replace(b'"body": {', b'"body": {"deep": ' + inner.encode() + b", ", 1)
    return raw


def _files(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        lines = [_hostile(rng, _line(rng, n)) if rng.random() < 0.3 else _line(rng, n).encode()
                 for n in range(rng.randint(1, 60))]
        data = b"\n".join(lines) + rng.choice((b"", b"\n", b"\n\n", b"\r\n", b"\n \n"))
        yield rng, data


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        j = i + (1 if rng.random() < 0.05 else rng.randint(1, max(1, len(data) // 3)))
        out.append(data[i:j])
        i = j
    return out


def _run(chunks: list[bytes], **limits) -> ValidationResult:
    v = JsonlValidator(**limits)
    for chunk in chunks:
        v.feed(chunk)
    return v.finish()


def _refuse(*_args) -> None:
    raise msgspec.DecodeError("refused: the plain path reads every line")


def _first_bad_byte_line_by_line(view: memoryview, start: int, stop: int) -> int:
    """The plain way: each line decoded alone; the first that fails names its bad byte."""
    i = start
    while i < stop:
        j = bytes(view[i:stop]).find(b"\n")
        j = stop if j < 0 else i + j
        try:
            bytes(view[i:j]).decode("utf-8")
        except UnicodeDecodeError as exc:
            return i + exc.start
        i = j + 1
    return stop


def _swapped(monkeypatch, **swaps):
    """Run a validation with these module names of jsonl_validation swapped."""
    def run(chunks: list[bytes], **limits) -> ValidationResult:
        with monkeypatch.context() as m:
            for name, value in swaps.items():
                m.setattr(jsonl_validation, name, value)
            return _run(chunks, **limits)
    return run


@pytest.fixture
def plain(monkeypatch):
    """The plain path only: every line decoded alone and read by the stdlib decoder, ids in the
    Python index."""
    return _swapped(monkeypatch, _read_request=_refuse, _read_requests=_refuse,
                    _first_bad_byte=_first_bad_byte_line_by_line, _NativeIndex=None)


@pytest.fixture
def in_python(monkeypatch):
    """The fast paths without core/_jsonl_native.c: its loops in Python."""
    return _swapped(monkeypatch, _NativeIndex=None, _object_lines=jsonl_validation._object_lines_in_python,
                    _first_deep_line=jsonl_validation._first_deep_line_in_python)


@pytest.fixture
def per_line(monkeypatch):
    """The typed reader line by line (no decode_lines)."""
    return _swapped(monkeypatch, _read_requests=_refuse)


@pytest.mark.parametrize("seed", range(6))
def test_hostile_files_in_random_chunks_match_the_plain_path(seed, plain, per_line, in_python):
    for rng, data in _files(seed, 60):
        chunks = _chunks(rng, data)
        limits = {"max_lines": rng.choice((5, 40, 1000)), "max_reported": rng.choice((3, 20, 100))}
        expected = plain([data], **limits)
        assert _run(chunks, **limits) == expected, data
        assert _run([data], **limits) == expected, data
        assert per_line(chunks, **limits) == expected, data
        assert in_python(chunks, **limits) == expected, data


def test_every_cut_of_a_file_of_multibyte_and_bad_bytes_matches_the_plain_path(plain):
    rng = random.Random(11)
    lines = [_line(rng, n).encode() for n in range(6)]
    lines[2] = lines[2][:30] + b"\xe6\x9d" + lines[2][30:]  # a cut character mid-line
    lines[4] = lines[4] + b"\xf0\x9f"  # and at the end of a line
    data = b"\n".join(lines) + "\n東京\n".encode()
    expected = plain([data])
    assert [p.code for p in expected.problems].count("invalid_utf8") == 2
    for cut in range(len(data) + 1):
        assert _run([data[:cut], data[cut:]]) == expected, cut


def test_a_bad_byte_at_every_position_of_a_line_is_named_as_the_plain_path_names_it(plain):
    rng = random.Random(5)
    good = [_line(rng, n).encode() for n in range(3)]
    target = _line(rng, 9).encode()
    for at in range(len(target) + 1):
        for bad in (0xFF, 0xC3, 0xED):
            data = b"\n".join([good[0], target[:at] + bytes([bad]) + target[at:], *good[1:]]) + b"\n"
            expected = plain([data])
            assert expected.problems[0].code == "invalid_utf8"
            assert _run([data]) == expected, (at, bad)


def test_two_objects_on_a_line_with_a_blank_line_elsewhere_are_both_reported():
    # decode_lines would read the region as three requests for three lines: the line count alone
    # does not tell them apart, so a region with a line not starting with "{" is read line by line.
    one = json.dumps({"custom_id": "a", "method": "POST", "url": URL, "body": {"model": "m"}})
    two = json.dumps({"custom_id": "b", "method": "POST", "url": URL, "body": {"model": "m"}})
    three = json.dumps({"custom_id": "c", "method": "POST", "url": URL, "body": {"model": "m"}})
    data = f"{one} {two}\n\n{three}\n".encode()
    res = _run([data])
    assert [(p.line, p.code) for p in res.problems] == [(1, "invalid_json_line"), (2, "invalid_json_line")]


def test_many_bad_lines_after_a_long_good_prefix_check_each_byte_a_bounded_number_of_times(monkeypatch):
    # A region's UTF-8 is checked at once; a UnicodeDecodeError holds a copy of all it was given, so
    # checking the whole rest again past each bad line would be quadratic (seconds for one chunk).
    checked = []
    first_bad_byte = jsonl_validation._first_bad_byte

    def counting(view, start, stop):
        checked.append(stop - start)
        return first_bad_byte(view, start, stop)

    monkeypatch.setattr(jsonl_validation, "_first_bad_byte", counting)
    good = b"\n".join(json.dumps({"custom_id": f"x{i}", "method": "POST", "url": URL,
                                  "body": {"model": "m"}}).encode() for i in range(2000))
    data = good + b"\n" + b"\xff\n" * 5000
    res = _run([data], max_lines=10_000)
    assert res.total_problems == 5000
    assert sum(checked) < 2 * len(data)


def _request(custom_id: str, **body) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": URL,
                       "body": {"model": "m", **body}}).encode()


@pytest.mark.parametrize("number", [
    b"9" * 4301,  # one digit past Python's int conversion limit: json refuses the line
    b"-" + b"1" * 5000,
    b"1" * 5000 + b".5",  # a float that long is fine for json
    b"7" * 4300,  # at the limit: fine
    b"1" * 2151,  # long enough to look like a long run to a sampler: fine
])
@pytest.mark.parametrize("where", ["alone", "among_others", "split_over_chunks"])
def test_a_very_long_number_gets_the_plain_verdict(number, where, plain, per_line):
    # json (the plain path) converts an integer by int(), which refuses past
    # sys.get_int_max_str_digits() digits; msgspec skipped such a number and called the line valid.
    line = (b'{"custom_id":"n","method":"POST","url":"/v1/chat/completions","body":{"model":"m","seed":'
            + number + b"}}")
    data = line + b"\n" if where == "alone" else b"\n".join([_request("a"), line, _request("b")]) + b"\n"
    expected = plain([data])
    chunks = [data[:len(data) // 3], data[len(data) // 3:]] if where == "split_over_chunks" else [data]
    assert _run(chunks) == expected
    assert per_line(chunks) == expected
    if number.lstrip(b"-").isdigit() and len(number.lstrip(b"-")) > 4300:
        assert [p.code for p in expected.problems] == ["invalid_json_line"]
    else:
        assert expected.ok


def test_a_long_digit_run_inside_a_string_stays_valid():
    # A run of digits in a prompt is text, not a number: valid, whatever the plain path is asked.
    data = _request("a", messages=[{"role": "user", "content": "4" * 9000}]) + b"\n"
    assert _run([data]).ok


def test_the_digit_sampler_finds_a_run_one_past_the_limit_at_every_offset():
    limit = jsonl_validation._INT_DIGITS
    for offset in range(jsonl_validation._DIGIT_STRIDE + 2):
        buf = b"a" * offset + b"5" * (limit + 1) + b"b" * 3000
        assert jsonl_validation._may_hold_a_long_integer(buf, 0, len(buf)), offset
        short = b"a" * offset + b"5" * (limit // 2) + b"b" * 3000
        assert not jsonl_validation._may_hold_a_long_integer(short, 0, len(short)), offset


def test_custom_ids_sharing_one_index_array_are_told_apart_as_a_dict_would():
    # The plain path shares the 12-byte index, so it is held to a dict here: ids chosen to land in
    # one of its 4096 arrays (the same low 12 bits of hash()), repeated at random.
    bucket = jsonl_validation._CustomIdIndex._BUCKET_BITS
    ids, n = [], 0
    while len(ids) < 150:
        n += 1
        if hash(f"c{n}") & ((1 << bucket) - 1) == 0x5A5:
            ids.append(f"c{n}")
    rng = random.Random(3)
    order = [rng.choice(ids) for _ in range(1500)]
    first: dict[str, int] = {}
    expected = []
    for lineno, cid in enumerate(order, 1):
        if cid in first:
            expected.append((lineno, f"custom_id {cid!r} is a duplicate of line {first[cid]}"))
        else:
            first[cid] = lineno
    data = b"\n".join(_request(cid) for cid in order) + b"\n"
    res = _run([data], max_reported=len(order))
    assert [(p.line, p.message) for p in res.problems] == expected


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_an_object_over_two_lines_beside_two_objects_on_one_line_is_not_read_as_three_requests(newline, plain):
    # decode_lines reads an object across a newline (JSON whitespace) and two objects on one line as
    # two: three lines, every one starting with "{", gave three requests, and the file was valid.
    head = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":'
    data = newline.join([head, b'{"model":"m"}}', _request("b") + _request("c")]) + newline
    expected = plain([data])
    assert [(p.line, p.code) for p in expected.problems] == [(n, "invalid_json_line") for n in (1, 2, 3)]
    assert _run([data]) == expected


# Characters of every str kind, escapes' targets, and bytes-in-other-kinds twins ("\xff\xff", "\uffff").
_STRICT_CHARS = ("a", "b", "Z", "0", "-", "é", "ß", "ÿ", "東", "数", "🚀", "😀", "\u2028", "\t", '"', "\\", "/",
                 "\x00", "\x7f", "\uffff")
_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/moderations")
_OTHER_URLS = ("/v1/x", "/é", "/v1/chat/completions/", "", "/V1/CHAT/COMPLETIONS", "/🚀")
_ODD_VALUES = ("null", "5", '""', "[]", "{}", "true", '"\\ud800"', "1.5", '"x"')


def _escaped(rng: random.Random, text: str) -> str:
    """`text` as a JSON string, some characters written as \\u escapes (pairs for astral ones) or \\/."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or rng.random() < 0.15:
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04x}")
        elif ch == "/" and rng.random() < 0.3:
            out.append("\\/")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _strict_case(rng: random.Random) -> tuple[bytes, dict]:
    """A file aimed at the strict region reader's types (lengths in characters at the limits, escapes,
    duplicate keys with one valid and one invalid value, urls against a custom supported set, up to
    70 groups, runs of one group past MAX_GROUP_LINES), and the limits to validate it with."""
    max_id, max_model = rng.choice((1, 2, 3, 8, 512)), rng.choice((1, 2, 4, 256))
    supported = _ENDPOINTS if rng.random() < 0.5 else tuple(rng.sample(_ENDPOINTS + _OTHER_URLS, rng.randint(1, 5)))
    limits = {"max_custom_id_chars": max_id, "max_model_chars": max_model, "supported_endpoints": supported,
              "max_lines": rng.choice((3, 20, 100, 100_000)), "max_reported": rng.choice((1, 5, 20, 1000))}

    def text(n: int) -> str:
        return "".join(rng.choice(_STRICT_CHARS) for _ in range(n))

    models = list(dict.fromkeys(text(rng.randint(1, max_model + (rng.random() < 0.2)))
                                for _ in range(rng.choice((1, 2, 5, 70)))))
    urls = list(supported) + list(_OTHER_URLS if rng.random() < 0.2 else ())
    url, model, ids, lines = rng.choice(urls), rng.choice(models), [], []
    for n in range(rng.choice((1, 5, 30, 200))):
        if rng.random() < 0.1:
            url, model = rng.choice(urls), rng.choice(models)
        cid = rng.choice(ids) if ids and rng.random() < 0.08 else text(rng.choice((1, max_id - 1, max_id, max_id + 1)))
        if rng.random() < 0.05:  # ids whose bytes are the same in other str kinds: hash() is equal
            cid = rng.choice(("\xff\xff", "\uffff", "ab", "\u6261", "\U0001f680", "\uf680\x01"))
        ids.append(cid)
        body = [("model", _escaped(rng, model))]
        if rng.random() < 0.3:
            body.append(("messages", f'[{{"role":"user","content":{_escaped(rng, text(5))}}}]'))
        if rng.random() < 0.05:
            body.insert(0, ("model", rng.choice(_ODD_VALUES)))
        if rng.random() < 0.05:
            body.append(("model", rng.choice(_ODD_VALUES + (_escaped(rng, rng.choice(models)),))))
        fields = [("custom_id", _escaped(rng, cid)),
                  ("method", _escaped(rng, "POST") if rng.random() < 0.95 else rng.choice(('"post"', "null", '"POST "'))),
                  ("url", _escaped(rng, url)),
                  ("body", "{" + ",".join(f"{_escaped(rng, k)}:{v}" for k, v in body) + "}"
                   if rng.random() < 0.97 else rng.choice(_ODD_VALUES))]
        if rng.random() < 0.05:  # a duplicate key before the real one, of another type
            fields.insert(0, (rng.choice(("custom_id", "method", "url", "body")), rng.choice(_ODD_VALUES)))
        if rng.random() < 0.05:  # a duplicate key after it: the last wins
            fields.append((rng.choice(("custom_id", "method", "url")),
                           rng.choice((rng.choice(_ODD_VALUES), _escaped(rng, cid), '"POST"', _escaped(rng, url)))))
        if rng.random() < 0.03:
            fields = [f for f in fields if f[0] != rng.choice(("custom_id", "method", "url", "body"))]
        if rng.random() < 0.1:
            rng.shuffle(fields)
        raw = ("{" + ",".join(f"{_escaped(rng, k)}:{v}" for k, v in fields) + "}").encode("utf-8", "surrogatepass")
        lines.append(raw + (b"\r" if rng.random() < 0.03 else b""))
        if rng.random() < 0.02:
            lines.append(rng.choice((b"", b" ", b"\r")))
    lead = rng.choice((b"", b"", b"\n", b"\n\n", b" \n"))
    return lead + b"\n".join(lines) + rng.choice((b"", b"\n", b"\n\n", b"\r\n")), limits


@pytest.mark.parametrize("seed", range(4))
def test_the_strict_region_reader_matches_the_plain_path_with_any_limits_and_endpoints(seed, plain, per_line,
                                                                                         in_python):
    # The strict reader's types are the rules themselves: a line they take must be one the rules take,
    # with the same groups, first lines and duplicates. 15,000 such files (scripts: this generator)
    # gave no difference; this runs 4 x 60.
    for case in range(60):
        rng = random.Random(seed * 1000 + case)
        data, limits = _strict_case(rng)
        chunks = _chunks(rng, data)
        expected = plain([data], **limits)
        assert _run(chunks, **limits) == expected, (data, limits)
        assert _run([data], **limits) == expected, (data, limits)
        assert per_line(chunks, **limits) == expected, (data, limits)
        assert in_python(chunks, **limits) == expected, (data, limits)


def _nested(depth: int, custom_id: str = "d") -> bytes:
    """A valid request line whose arrays and objects nest exactly ``depth`` deep (the line's own object is 1)."""
    inner = '{"k": ' * (depth - 3) + '"[[{{ \\" ]"' + "}" * (depth - 3)  # brackets in a string do not count
    return (f'{{"custom_id": "{custom_id}", "method": "POST", "url": "{URL}", "body": {{"model": "m", "x": [{inner}]}}}}'
            .encode())


@pytest.mark.parametrize("where", ["alone", "among_others", "split_over_chunks", "byte_by_byte"])
def test_a_line_at_the_nesting_limit_is_valid_and_one_past_it_is_not_on_every_path(where, plain, per_line, in_python):
    limit = jsonl_validation.MAX_NESTING
    at, past = _nested(limit, "at"), _nested(limit + 1, "past")
    assert json.loads(at) and json.loads(past)  # both are JSON that json reads
    lines = [at, past] if where == "alone" else [_request("a"), at, _request("b"), past, _request("c"), past[:-1]]
    data = b"\n".join(lines) + b"\n"
    chunks = {"alone": [data], "among_others": [data],
              "split_over_chunks": [data[:len(data) // 3], data[len(data) // 3:len(data) * 2 // 3], data[len(data) * 2 // 3:]],
              "byte_by_byte": [data[i:i + 1] for i in range(len(data))]}[where]
    expected = plain([data])
    past_at = [2] if where == "alone" else [4]
    assert [(p.line, p.code) for p in expected.problems][:1] == [(past_at[0], "invalid_json_line")]
    assert f"more than {limit} levels" in expected.problems[0].message
    if where != "alone":  # the cut one is invalid as well (not JSON, and as deep)
        assert [p.line for p in expected.problems] == [4, 6]
    for run in (_run, per_line, in_python):
        assert run(chunks) == expected, run


def test_a_deep_line_in_a_region_of_valid_lines_is_the_only_one_refused():
    # The region of valid lines is read by decode_lines when no line is too deep; one deep line sends
    # the region line by line, and the lines after it are still checked (a second deep one found too).
    limit = jsonl_validation.MAX_NESTING
    lines = [_request(f"r{n}") for n in range(50)]
    lines[10] = _nested(limit + 1, "deep-1")
    lines[40] = _nested(10 * limit, "deep-2")
    lines[45] = _request("r3")  # a duplicate after them is still seen
    res = _run([b"\n".join(lines) + b"\n"])
    assert [(p.line, p.code) for p in res.problems] == [
        (11, "invalid_json_line"), (41, "invalid_json_line"), (46, "duplicate_custom_id")]


@pytest.mark.skipif(jsonl_validation._first_deep_line is jsonl_validation._first_deep_line_in_python,
                    reason="core/_jsonl_native.c is not built")
def test_the_nesting_scan_in_c_finds_what_its_python_twin_finds():
    # Bracket soup with strings, escapes and newlines, at random limits and offsets: the C scan counts
    # brackets 64 bytes at a time before it walks a line, the Python one with bytes.count.
    rng = random.Random(5)
    for _ in range(3000):
        buf = bytes(rng.choice(b'[]{}"\\ax\n') for _ in range(rng.randint(0, 400)))
        start = rng.randint(0, len(buf))
        limit = rng.randint(0, 24)
        assert (jsonl_validation._first_deep_line(buf, start, len(buf), limit)
                == jsonl_validation._first_deep_line_in_python(buf, start, len(buf), limit)), (buf, start, limit)


@pytest.mark.parametrize("where", ["one_chunk", "split_over_chunks"])
def test_a_long_number_beside_a_deep_line_gets_the_plain_verdict(where, plain, per_line, in_python):
    # A deep line sends its region line by line; a line there with an integer int() refuses must
    # still be read the plain way (msgspec skips such a number in a member it does not read).
    long_number = (b'{"custom_id":"n","method":"POST","url":"/v1/chat/completions","body":{"model":"m","seed":'
                   + b"9" * 4301 + b"}}")
    data = b"\n".join([_request("a"), _nested(jsonl_validation.MAX_NESTING + 1), long_number, _request("b")]) + b"\n"
    chunks = [data] if where == "one_chunk" else [data[:100], data[100:]]
    expected = plain([data])
    assert [(p.line, p.code) for p in expected.problems] == [(2, "invalid_json_line"), (3, "invalid_json_line")]
    for run in (_run, per_line, in_python):
        assert run(chunks) == expected, run
