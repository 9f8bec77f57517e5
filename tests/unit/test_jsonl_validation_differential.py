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


def _refuse(_buf) -> None:
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
    """The plain path only: every line decoded alone and read by the stdlib decoder."""
    return _swapped(monkeypatch, _read_request=_refuse, _read_requests=_refuse,
                    _first_bad_byte=_first_bad_byte_line_by_line)


@pytest.fixture
def per_line(monkeypatch):
    """The typed reader line by line (no decode_lines)."""
    return _swapped(monkeypatch, _read_requests=_refuse)


@pytest.mark.parametrize("seed", range(6))
def test_hostile_files_in_random_chunks_match_the_plain_path(seed, plain, per_line):
    for rng, data in _files(seed, 60):
        chunks = _chunks(rng, data)
        limits = {"max_lines": rng.choice((5, 40, 1000)), "max_reported": rng.choice((3, 20, 100))}
        expected = plain([data], **limits)
        assert _run(chunks, **limits) == expected, data
        assert _run([data], **limits) == expected, data
        assert per_line(chunks, **limits) == expected, data


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
