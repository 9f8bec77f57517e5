"""Streaming validation of an OpenAI batch input file (JSONL) while it is uploaded.

Pure and synchronous: feed the upload's chunks in order, then call ``finish()``.
Chunks may split lines anywhere, even inside a multi-byte UTF-8 character.
Memory stays flat: only the current partial line and a compact index of the
custom_ids seen (12 bytes an id, whatever its length: ``_CustomIdIndex``) are
kept, never the whole file.

Rules follow OpenAI's batch input validation (codes as in its ``errors.data``):

* the file is UTF-8 (``invalid_utf8``, at the line holding the bad byte);
* every non-blank line is one JSON object (``invalid_json_line``), whose arrays and
  objects nest at most ``MAX_NESTING`` (128) levels deep, the line's own object being
  level 1 (past it ``invalid_json_line``, "nested too deeply ...", whatever else the line
  holds, checked before its JSON on every path: ``_first_deep_line``, one C call a region,
  ~0.12 ms per MiB). Every reader of an accepted line (json, msgspec, the providers'
  ``rewrite_line`` and ``request_size``) recurses once a level in whatever stack it runs
  in; real requests nest 20-60 (see ``MAX_NESTING``). A trailing
  newline, CRLF endings and blank lines at the very end of the file are fine;
  a blank line followed by a request line is ``invalid_json_line``, and so is
  a line starting with a UTF-8 byte order mark (its message says so);
* no string in the line, key or value, holds an unpaired UTF-16 surrogate
  (``unpaired_surrogate``): ``"\\ud800"`` is valid JSON but no UTF-8 text, so
  it could be neither stored nor sent on. The message names where it sits
  (the string at ``'body.messages[0].content'``, a key in ``'body'``); the
  line's other rules are not checked;
* ``custom_id`` non-empty string (``missing_custom_id``) of at most
  ``max_custom_id_chars`` characters (``custom_id_too_long``), unique
  (``duplicate_custom_id``);
* ``method`` == ``"POST"`` (``invalid_method``);
* ``url`` one of the supported endpoints (``unsupported_url``);
* ``body`` an object (``invalid_body``) whose ``model`` is a non-empty string
  (``missing_model``) of at most ``max_model_chars`` characters
  (``model_too_long``);
* lines may mix endpoints and models (CreateBatch splits such a file into one
  job per endpoint and target: domain/shards.py). The valid lines are counted by
  (``url``, ``body.model``) into ``ValidationResult.groups`` (``FileGroup``: the
  count and the first ``MAX_GROUP_LINES`` line numbers, groups in order of first
  appearance); a line that would start group ``MAX_FILE_GROUPS + 1`` is
  ``too_many_groups`` (once: later lines of new groups are not counted);
* at least one request line (``empty_file``, line 0); at most ``max_lines``
  request lines (``too_many_tasks``, once); at most ``max_bytes`` bytes
  (``file_too_large``, once; validation stops there).

``ValidationResult.line_count`` counts request lines (non-blank lines, valid or
not); ``LineProblem.line`` is the physical 1-based line number.

Once a line goes past ``max_lines`` (reported as ``too_many_tasks``) the file is
rejected anyway, so later lines are only counted (``bytes.count``, no JSON, no
further problems, blank lines counted too): a 200 MB flood of tiny lines then
costs no Python work per line and the custom_id map stops at ``max_lines`` ids.

Lengths count characters (code points), not bytes. Every message
quotes user data through ``_show`` (``repr``, at most 80 characters), so a
problem stays short and encodable whatever the line held.

Performance: the complete lines of each chunk are checked for UTF-8 at once (one
strict decode of the region, skipped when the chunk is all ASCII; a bad byte is
named exactly as a decode of its line alone names it, and the lines after it in the
chunk are checked one by one), then read by msgspec against a typed schema of the four fields the
rules look at (``_Request``) straight from the bytes: it checks each line's whole
syntax but builds no object for the rest (messages, tools ...). A region whose
lines all start with "{" and end with "}" is read by one ``decode_lines`` call and kept
only when it gives one request a line (``_read_region``); otherwise its lines are read one by
one (a memoryview slice each, no copy). ``bench/validate_speed.py`` compares it
with json, orjson and msgspec's untyped decoder. msgspec accepts a line only when
json would accept it with the same four values (duplicate keys: the last wins in
both; it refuses lone surrogate escapes, NaN and anything a typed field does not
match; a region that may hold an integer of more digits than int() converts, which json
refuses and msgspec skips, is read the plain way: ``_may_hold_a_long_integer``), so every line it
refuses, and only those, goes the old way: decoded to str
for the stdlib decoder, for the verdict and the message, then a walk for unpaired
surrogates (tests/unit/test_jsonl_validation_differential.py holds the fast paths
to that plain one on hostile files).

A region read whole is read against the rules themselves (``_strict_reader``: the four
fields' types, lengths and allowed values), so that a region it reads is valid but for
duplicate custom_ids: when its lines are of one group, nothing is checked line by line in
Python (``_take_valid_run``): the group's count and first lines grow at once, and the ids
go to the index in one call. A region it refuses (some line breaks a rule) is read line by
line by the plain typed reader, the rules checked on each, as before. The two loops left,
the region's line scan and the custom_id index, are in C (core/_jsonl_native.c, built by
``pip install -e .``; their Python twins here are the fallback and the tests' reference):
1.2 ms per MiB of a 200 MiB file, from 3.0 with both in Python.
"""

from __future__ import annotations

import json
import random
import re
import sys
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from typing import Annotated, Literal

import msgspec

from batchgate_server.domain.shards import MAX_FILE_GROUPS, MAX_GROUP_LINES, FileGroup

try:
    from batchgate_server.core._jsonl_native import CustomIdIndex as _NativeIndex
    from batchgate_server.core._jsonl_native import object_lines as _object_lines
except ImportError:  # a source tree whose extension was never built (pip install -e . builds it)
    _NativeIndex = None
    _object_lines = None
try:
    from batchgate_server.core._jsonl_native import first_deep_line as _first_deep_line
except ImportError:  # not built, or built before it had this function: only the nesting scan is in Python
    _first_deep_line = None

__all__ = [
    "SUPPORTED_ENDPOINTS",
    "LineProblem",
    "ValidationResult",
    "JsonlValidator",
]

SUPPORTED_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
    "/v1/moderations",
)

# Problem codes.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON_LINE = "invalid_json_line"
MISSING_CUSTOM_ID = "missing_custom_id"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
INVALID_METHOD = "invalid_method"
UNSUPPORTED_URL = "unsupported_url"
INVALID_BODY = "invalid_body"
MISSING_MODEL = "missing_model"
EMPTY_FILE = "empty_file"
UNPAIRED_SURROGATE = "unpaired_surrogate"
CUSTOM_ID_TOO_LONG = "custom_id_too_long"
MODEL_TOO_LONG = "model_too_long"
TOO_MANY_GROUPS = "too_many_groups"

# OpenAI documents no custom_id limit; 512 is the longest string it bounds in a batch
# (a metadata value), far past any id scheme (a UUID is 36, Anthropic allows 64).
MAX_CUSTOM_ID_CHARS = 512
# Model names are short: provider ids, Bedrock ARNs included, stay well under this.
MAX_MODEL_CHARS = 256
TOO_MANY_TASKS = "too_many_tasks"
FILE_TOO_LARGE = "file_too_large"

_JSON_WS = " \t\r\n"

# The deepest a line's arrays and objects may nest (its own object is level 1), on every path alike.
# Every line accepted is read again later by code that recurses once a level (json, msgspec, the
# providers' rewrite_line and request_size, each in whatever call stack it runs): without a limit of its
# own, the validator's was the interpreter's recursion limit (1000) minus its own shallow stack, and a
# line accepted at ~990 could raise RecursionError in a deeper one. Real requests nest far less: a deep
# JSON schema in response_format or tools reaches 20-60 (OpenAI's strict schemas allow 10 levels of
# object nesting, ~2-3 JSON levels each, under body.response_format.json_schema.schema). 128, serde_json's
# default, leaves twice that and ~870 frames for any reader's own stack.
MAX_NESTING = 128
_TOO_DEEP = (f"line is nested too deeply: its arrays and objects nest more than {MAX_NESTING} levels deep"
             f" (at most {MAX_NESTING} are allowed)")


@dataclass
class LineProblem:
    line: int  # 1-based line number (0 for whole-file problems such as empty_file)
    code: str
    message: str


@dataclass
class ValidationResult:
    line_count: int  # request (non-blank) lines, valid or not (past max_lines: all lines)
    endpoint: str  # the url of the file's one group ("" if none or several)
    model: str  # the body.model of the file's one group ("" if none or several)
    problems: list[LineProblem] = field(default_factory=list)  # first max_reported, line order
    total_problems: int = 0  # every problem found
    # The valid lines by (url, body.model), in order of first appearance (at most MAX_FILE_GROUPS).
    groups: list[FileGroup] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.total_problems == 0


def _reject_constant(name: str) -> None:
    # NaN / Infinity / -Infinity are not JSON.
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode_json = _decoder.decode
# The C scanner behind JSONDecoder.decode, without its two regex calls per line:
# (value, end) for a value starting at index 0, StopIteration if none does.
_scan_once = _decoder.scan_once

class _Body(msgspec.Struct, gc=False):
    model: str


class _Request(msgspec.Struct, gc=False):
    """The fields of a request line the rules read, each of the type a valid line has.
    Other fields are checked for syntax and skipped; a line that does not fit goes to
    the stdlib decoder, which gives today's verdict and message. Untracked by the garbage
    collector (they hold strings only, so no cycle): a region's thousands of them, alive at
    once, would otherwise set off collections that walk them all."""
    custom_id: str
    method: str
    url: str
    body: _Body


_request_decoder = msgspec.json.Decoder(_Request)
_read_request = _request_decoder.decode


@lru_cache(maxsize=16)
def _strict_reader(supported: frozenset[str], max_custom_id: int, max_model: int):
    """decode_lines of a decoder whose types are the rules themselves: a line it reads is valid but for
    a duplicate custom_id (and its group). custom_id and body.model non-empty and not too long (msgspec
    counts characters, as len() does), method "POST", url a supported endpoint. A region it refuses is
    read line by line by the plain typed reader, whose lines the rules check one by one. None for a
    validator that supports no endpoint (every line is then read line by line). With it, the type
    its lines' bodies have."""
    if not supported:
        return None, None
    body = msgspec.defstruct("_ValidBody", [("model", Annotated[str, msgspec.Meta(min_length=1, max_length=max_model)])],
                             gc=False)
    request = msgspec.defstruct("_ValidRequest", [
        ("custom_id", Annotated[str, msgspec.Meta(min_length=1, max_length=max_custom_id)]),
        ("method", Literal["POST"]),
        ("url", Literal[tuple(sorted(supported))]),
        ("body", body),
    ], gc=False)
    return msgspec.json.Decoder(request).decode_lines, body


def _read_requests(region: memoryview, read_lines=_request_decoder.decode_lines) -> list:
    """Every line of `region` read by one call of `read_lines` (a decoder's decode_lines)."""
    return read_lines(region)


_custom_id_of = attrgetter("custom_id")
_url_of = attrgetter("url")
_model_of = attrgetter("body.model")
# A line msgspec refuses, for any reason, is decided by the stdlib decoder.
_FAST_REFUSALS = (msgspec.DecodeError, RecursionError)

# json converts an integer with int(), which refuses one of more than this many digits (0: no
# limit); msgspec skips such a number in a member it does not read and would call the line valid.
_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 0)()
# A run of _INT_DIGITS + 1 digits holds two sample points this far apart: sampling the region at
# this stride finds every such run for ~1/2000 of a pass over it.
_DIGIT_STRIDE = (_INT_DIGITS + 1) // 2
_DIGIT_MARKS = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))  # digits -> "0", else " "


def _may_hold_a_long_integer(buf: bytes, start: int, stop: int) -> bool:
    """True when ``buf[start:stop]`` holds a run of more than ``_INT_DIGITS`` digits, or one
    of more than half as many (harmless: such a region is only read the plain way)."""
    stride = _DIGIT_STRIDE
    if not stride or stop - start <= _INT_DIGITS:
        return False
    marks = buf[start:stop:stride].translate(_DIGIT_MARKS)
    at = marks.find(b"00")
    while at >= 0:
        first = start + at * stride
        if buf[first:first + stride + 1].isdigit():
            return True
        at = marks.find(b"00", at + 1)
    return False


def _refuse_typed(_line: object) -> None:
    raise msgspec.DecodeError("the line is read the plain way")


_BLANK = object()
_INVALID = object()
# The url and model of "no group yet": equal to no value a line can hold (None included).
_NO_GROUP = object()


def _parse_line(line: str) -> tuple[object, str]:
    """What the stdlib decoder makes of a line: (value, "") | (_BLANK, "") | (_INVALID, message)."""
    try:
        obj, end = _scan_once(line, 0)
    except (StopIteration, ValueError, RecursionError):
        return _parse_slow(line)
    if end != len(line) and line[end:].strip(_JSON_WS):
        return _parse_slow(line)
    return obj, ""


def _parse_slow(line: str) -> tuple[object, str]:
    """(value, "") | (_BLANK, "") | (_INVALID, message) for a line the fast path refused."""
    try:
        return _decode_json(line), ""
    except (ValueError, RecursionError) as exc:
        if not line.strip(_JSON_WS):
            return _BLANK, ""
        if line.startswith("\ufeff"):
            return _INVALID, ("line starts with a UTF-8 byte order mark (BOM, bytes EF BB BF), which JSON does not"
                              " allow: save the file as UTF-8 without a BOM")
        return _INVALID, "line is not valid JSON: " + _describe(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def _read_region(buf: bytes, view: memoryview, start: int, stop: int, room: int, read_lines) -> list | None:
    """Every line of ``buf[start:stop]`` (UTF-8, ending in a newline) read by one msgspec call, when
    each is a request line of the types of ``read_lines`` and they are at most ``room``; else None (the lines are
    then read one by one). ``decode_lines`` skips blank lines and would read two objects on one line
    as two items, and it reads an object across lines (a newline is whitespace to it), so an object
    spread over two lines beside two objects on one line would balance the count. It is trusted only
    when every line starts with "{" (none is blank) and ends with "}" (before an optional CR): a
    newline after "}" and before "{" lies in no string (a string holds no raw newline) and in no
    object or array (there "}" is followed by "," or a closing bracket), so no object spans lines,
    and one item a line then means each line held exactly one object, which is what a line read
    alone must hold (``_object_lines``)."""
    if stop - start < 2 or buf[stop - 1] != 10:
        return None
    lines = _object_lines(buf, start, stop)
    if lines < 0 or lines > room:
        return None
    try:
        requests = _read_requests(view[start:stop], read_lines)
    except _FAST_REFUSALS:
        return None
    return requests if len(requests) == lines else None


def _object_lines_in_python(buf: bytes, start: int, stop: int) -> int:
    """The lines of ``buf[start:stop]`` (which ends with a newline) when each starts with "{" and ends with
    "}" (before an optional CR), else -1. The lines are found by ``find`` (memchr) from line to line:
    ``bytes.count`` runs a byte at a time here. core/_jsonl_native.c has the same loop in C."""
    find = buf.find
    lines = 0
    i = start
    while i < stop:
        if buf[i] != 123:  # "{"
            return -1
        j = find(b"\n", i, stop)  # never -1: the region ends with a newline
        last = buf[j - 1]  # j > i: the line starts with "{"
        if last != 125 and (last != 13 or buf[j - 2] != 125):  # "}", or "}" then CR
            return -1
        i = j + 1
        lines += 1
    return lines


if _object_lines is None:
    _object_lines = _object_lines_in_python

# A string (an escape skips the character after it; one never closed runs to the line's end) or a bracket.
_NESTING_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)


def _first_deep_line_in_python(buf: bytes, start: int, stop: int, limit: int) -> int:
    """Where the first line of ``buf[start:stop]`` starts whose arrays and objects nest more than ``limit``
    deep (brackets outside strings), or -1. A line of at most ``limit`` "[" and "{" cannot: only such a line
    is walked. core/_jsonl_native.c has the same function in C."""
    if buf.count(b"[", start, stop) + buf.count(b"{", start, stop) <= limit:
        return -1
    i = start
    while i < stop:
        j = buf.find(b"\n", i, stop)
        j = stop if j < 0 else j
        if buf.count(b"[", i, j) + buf.count(b"{", i, j) > limit:
            depth = 0
            for token in _NESTING_TOKEN.finditer(buf, i, j):
                c = buf[token.start()]
                if c == 91 or c == 123:  # "[" "{"
                    depth += 1
                    if depth > limit:
                        return i
                elif c != 34:  # "]" "}"
                    depth -= 1
        i = j + 1
    return -1


if _first_deep_line is None:
    _first_deep_line = _first_deep_line_in_python


def _first_bad_byte(view: memoryview, start: int, stop: int) -> int:
    """The index in ``view`` of the first byte of ``view[start:stop]`` that is not UTF-8, or ``stop``.
    ``start`` is a line's first byte, so the decoder starts in step with the text: the byte found is
    the one a strict decode of the line alone names (a sequence cut short by the line's end is named
    by its first byte either way, the newline being no continuation byte). The UnicodeDecodeError
    holds a copy of all it was given: past a bad line, lines are checked one by one (one copy of
    the whole rest per bad line would be quadratic in a region of many bad lines)."""
    try:
        str(view[start:stop], "utf-8")
    except UnicodeDecodeError as exc:
        return start + exc.start
    return stop


def _unencodable(text: str) -> bool:
    """True when `text` holds a surrogate, i.e. an unpaired one: the JSON decoder joins
    escaped pairs. (Encoding runs at GB/s; ASCII strings are answered at once.)"""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unpaired_surrogate_at(line: dict) -> str | None:
    """Where the first string holding an unpaired surrogate sits in a parsed line ("the string
    at 'body.messages[0].content'", "a key in 'body'"), or None. Iterative: the
    line may nest as deeply as the JSON scanner allows. Each node keeps only a link to its parent
    step, and the path is spelled out for the reported string alone: building every node's path
    would copy long keys once per descendant (a 40 MB line of nested long keys took 39 s)."""
    stack: list[tuple[object, tuple | None]] = [(line, None)]
    while stack:
        value, steps = stack.pop()
        if value.__class__ is str:
            if _unencodable(value):
                return f"the string at {_show(_spell_path(steps))}"
        elif value.__class__ is dict:
            for key, item in reversed(value.items()):
                if _unencodable(key):
                    return f"a key in {_show(_spell_path(steps))}" if steps else "a top-level key"
                stack.append((item, (steps, key)))
        elif value.__class__ is list:
            stack.extend((value[i], (steps, i)) for i in reversed(range(len(value))))
    return None


def _spell_path(steps: tuple | None, key_limit: int = 40) -> str:
    """``body.messages[0].content`` from the (parent, key or index) links, long keys cut short."""
    names: list[object] = []
    while steps is not None:
        steps, step = steps
        names.append(step)
    path = ""
    for step in reversed(names):
        if step.__class__ is int:
            path += f"[{step}]"
        else:
            name = step if len(step) <= key_limit else step[: key_limit - 3] + "..."
            path += f".{name}" if path else name
    return path


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _CustomIdIndex:
    """custom_id -> the line it first appeared on, in 12 bytes an id whatever its length.

    A Python dict of the ids took ~200 bytes an id (+41 MiB for 203k lines). Here an id is
    two SipHash values (``hash()``, keyed per process, so no input can aim at a collision):
    the low 12 bits of the first pick one of 4096 sorted arrays, and the id is kept there as
    one 64-bit word, the first hash xored with the id's length and with those 12 bits (known
    from the array) replaced by 12 bits of the second (the length because ``hash()`` hashes a
    str's bytes in its own kind: "ab" and "\u6261" collide under every key); beside it, in 32 bits (64 past four billion lines), its line. An id is
    a duplicate when its word is there: a false report between two different ids needs a
    76-bit collision of a keyed hash (about 7e-12 for a million ids). Arrays of a few hundred
    entries keep the sorted insert a short memmove.

    The validator uses the same structure in C (core/_jsonl_native.c, built with the package:
    ``_new_index``), ~0.6 us an id cheaper; this one is its reference in the tests, and the index
    where the C one is not built or a file could pass 2**32 lines. Both have ``add`` and ``add_run``.
    """

    _BUCKET_BITS = 12

    def __init__(self, max_line: int) -> None:
        self.mask = (1 << self._BUCKET_BITS) - 1
        self.line_type = "I" if max_line < 1 << 32 else "Q"
        # (words, lines) of each array, made on first use: a validator of a small file makes a few.
        self.buckets: list[tuple[array, array] | None] = [None] * (1 << self._BUCKET_BITS)

    def add(self, custom_id: str, line: int) -> int:
        """The line ``custom_id`` first appeared on, or 0: it is new, now held as ``line``'s."""
        key = hash(custom_id)
        # hash() hashes a str's canonical bytes: "ab" and "\u6261" (same bytes, other kinds) hash
        # alike under any key. Such strings differ in length, which the word holds (xored in).
        word = ((key ^ (len(custom_id) << self._BUCKET_BITS)) & ~self.mask) | (hash(custom_id + "\0") & self.mask)
        bucket = self.buckets[key & self.mask]
        if bucket is None:
            bucket = self.buckets[key & self.mask] = (array("q"), array(self.line_type))
        words = bucket[0]
        at = bisect_left(words, word)
        if at < len(words) and words[at] == word:
            return bucket[1][at]
        words.insert(at, word)
        bucket[1].insert(at, line)
        return 0

    def add_run(self, ids: list[str], first_line: int) -> list[tuple[int, str, int]]:
        """Add the ids of lines ``first_line``, ``first_line + 1``, ...: (line, id, its first line) of
        each that is a duplicate, in line order."""
        add = self.add
        return [(line, cid, before) for line, cid in enumerate(ids, first_line) if (before := add(cid, line))]


def _new_index(max_line: int):
    """The custom_id index of a validator whose lines stay below ``max_line``: the C one when built."""
    if _NativeIndex is not None and max_line < 1 << 32:
        return _NativeIndex(random.getrandbits(64))
    return _CustomIdIndex(max_line)


class JsonlValidator:
    """Validates an OpenAI batch input JSONL fed in arbitrary chunks."""

    def __init__(
        self,
        *,
        max_lines: int = 50_000,
        max_bytes: int = 200 * 1024 * 1024,
        supported_endpoints=SUPPORTED_ENDPOINTS,
        max_reported: int = 20,
        max_custom_id_chars: int = MAX_CUSTOM_ID_CHARS,
        max_model_chars: int = MAX_MODEL_CHARS,
    ) -> None:
        self._max_lines = max_lines
        self._max_custom_id = max_custom_id_chars
        self._max_model = max_model_chars
        self._max_bytes = max_bytes
        self._supported = frozenset(supported_endpoints)
        self._max_reported = max_reported

        self._bytes = 0  # bytes fed so far
        self._parts: list[bytes] = []  # pieces of the current, incomplete line
        self._lineno = 0  # physical lines consumed so far
        self._tasks = 0  # request (non-blank) lines seen
        self._blank_start = 0  # first line of a run of blank lines not yet judged
        self._blank_count = 0
        self._seen = _new_index(max_line=max_bytes + 1)  # custom_id -> line where it first appeared
        self._read_valid_lines, self._valid_body = _strict_reader(self._supported, max_custom_id_chars,
                                                                  max_model_chars)
        # (url, body.model) -> its group. The group of the last valid line is kept apart with
        # its count (written back to it when the group changes and at the end of a chunk).
        self._groups: dict[tuple[str, str], FileGroup] = {}
        self._group: FileGroup | None = None
        self._group_url: object = _NO_GROUP
        self._group_model: object = _NO_GROUP
        self._group_count = 0
        self._too_many_groups = False
        self._problems: list[LineProblem] = []
        self._total = 0
        # Past max_lines the file is rejected anyway: lines are only counted from then
        # on (bytes.count, GB/s) so that a flood of tiny lines costs no Python per line.
        self._counting = False
        self._open_line = False  # counting mode: the current line has uncounted bytes
        self._stopped = False  # max_bytes exceeded: nothing more is validated
        self._result: ValidationResult | None = None

    # ------------------------------------------------------------------ public

    @property
    def too_large(self) -> bool:
        return self._bytes > self._max_bytes

    def feed(self, chunk: bytes) -> None:
        """Validate the next chunk of the upload. Never raises for bad content."""
        if self._result is not None or not chunk:
            return
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        before = self._bytes
        self._bytes = before + len(chunk)
        if self._stopped:
            return
        if self._bytes > self._max_bytes:
            allowed = self._max_bytes - before
            self._consume(chunk[:allowed])
            self._stopped = True
            self._parts = []
            self._blank_count = 0
            # The first byte past the limit sits on the line after the ones consumed.
            self._add(
                self._lineno + 1,
                FILE_TOO_LARGE,
                f"file exceeds the maximum size of {self._max_bytes} bytes",
            )
            return
        self._consume(chunk)

    def finish(self) -> ValidationResult:
        """Validate the last (unterminated) line and return the result. Idempotent."""
        if self._result is not None:
            return self._result
        if self._stopped:
            pass  # the line being read when the limit was crossed is not looked at
        elif self._counting:
            if self._open_line:  # last line, without a final newline
                self._lineno += 1
                self._tasks += 1
        elif self._parts:
            tail = b"".join(self._parts)
            self._parts = []
            self._check_lines(tail, 0, len(tail))
        # Blank lines still pending are at the end of the file: allowed.
        self._blank_count = 0
        if self._tasks == 0 and not self._stopped:
            self._add(0, EMPTY_FILE, "file contains no request lines")
        groups = list(self._groups.values())
        single = groups[0] if len(groups) == 1 else None
        self._result = ValidationResult(
            line_count=self._tasks,
            endpoint=single.endpoint if single else "",
            model=single.model if single else "",
            problems=list(self._problems),
            total_problems=self._total,
            groups=groups,
        )
        return self._result

    # ---------------------------------------------------------------- internal

    def _add(self, line: int, code: str, message: str) -> None:
        self._total += 1
        if len(self._problems) < self._max_reported:
            self._problems.append(LineProblem(line, code, message))

    def _consume(self, chunk: bytes) -> None:
        if self._counting:
            self._count_lines(chunk, 0, len(chunk))
            return
        first = chunk.find(b"\n")
        if first < 0:
            if chunk:
                self._parts.append(chunk)
            return
        start = 0
        if self._parts:
            # The line that earlier chunks started ends in this one.
            self._parts.append(chunk[:first])
            line = b"".join(self._parts)
            self._parts = []
            self._check_lines(line, 0, len(line))
            start = first + 1
            if self._counting:
                self._count_lines(chunk, start, len(chunk))
                return
        stop = chunk.rfind(b"\n") + 1
        if start < stop:
            self._check_lines(chunk, start, stop)
            if self._counting:
                self._count_lines(chunk, stop, len(chunk))
                return
        if stop < len(chunk):
            self._parts.append(chunk[stop:])

    def _count_lines(self, buf: bytes, start: int, stop: int) -> None:
        """Counting mode: count the lines in ``buf[start:stop]`` without reading them."""
        if start >= stop:
            return
        k = buf.count(b"\n", start, stop)
        self._lineno += k
        self._tasks += k
        self._open_line = buf[stop - 1] != 10

    def _flush_blanks(self) -> None:
        """A request line follows pending blank lines: they were in the middle."""
        start, count = self._blank_start, self._blank_count
        self._blank_count = 0
        for line in range(start, start + count):
            self._add(line, INVALID_JSON_LINE, "blank line in the middle of the file")
            if len(self._problems) >= self._max_reported:
                # Only the count matters from here on.
                self._total += start + count - 1 - line
                break

    def _report_too_many(self, line: int) -> None:
        """Line ``line`` is one request too many: report it and only count from here on."""
        self._counting = True
        self._add(line, TOO_MANY_TASKS, f"file has more than {self._max_lines} requests")

    def _enter_group(self, url: str, model: str, line: int) -> FileGroup | None:
        """The group of (url, model), made on its first line; None past MAX_FILE_GROUPS."""
        group = self._groups.get((url, model))
        if group is None:
            if len(self._groups) >= MAX_FILE_GROUPS:
                if not self._too_many_groups:
                    self._too_many_groups = True
                    self._add(line, TOO_MANY_GROUPS,
                              f"url {_show(url)} with body.model {_show(model)} starts group {MAX_FILE_GROUPS + 1}"
                              f" of distinct (url, body.model) pairs; a file may have at most {MAX_FILE_GROUPS}")
                return None
            group = self._groups[(url, model)] = FileGroup(url, model)
        return group

    def _take_valid_run(self, requests: list) -> bool:
        """The lines after the last one checked, each read by the strict reader (so valid but for a
        duplicate custom_id), when they are of one group: counted at once, their ids indexed by
        the index's ``add_run``. False, with nothing taken, for lines of several groups (the
        line by line loop counts those)."""
        models = set(map(_model_of, requests))
        urls = set(map(_url_of, requests))
        if len(models) != 1 or len(urls) != 1:
            return False
        url, model = urls.pop(), models.pop()
        if url != self._group_url or model != self._group_model:
            if (url, model) not in self._groups and len(self._groups) >= MAX_FILE_GROUPS:
                return False  # the loop reports the group one too many
            if self._group is not None:
                self._group.count = self._group_count
            self._group = self._enter_group(url, model, self._lineno + 1)
            self._group_url, self._group_model, self._group_count = url, model, self._group.count
        if self._blank_count:
            self._flush_blanks()
        first = self._lineno + 1
        count = len(requests)
        self._lineno += count
        self._tasks += count
        room = MAX_GROUP_LINES - self._group_count
        if room > 0:
            self._group.first_lines.extend(range(first, first + min(room, count)))
        self._group_count += count
        self._group.count = self._group_count
        for line, cid, before in self._seen.add_run(list(map(_custom_id_of, requests)), first):
            self._add(line, DUPLICATE_CUSTOM_ID, f"custom_id {_show(cid)} is a duplicate of line {before}")
        return True

    def _check_lines(self, buf: bytes, start: int, stop: int) -> None:
        """Validate the lines in ``buf[start:stop]``.

        Every line there ends with b"\\n", except that a line reaching ``stop`` may not.
        Hot loop: the region's UTF-8 is checked once (``_first_bad_byte``: one C call for the
        whole region; past a bad line, line by line), each line is read straight out
        of ``buf`` through a memoryview (no per-line copy, no per-line str) by msgspec's typed
        decoder, and only a line it refuses is decoded to str for the stdlib decoder; everything
        the valid path needs is a local.
        """
        view = memoryview(buf)
        find = buf.find
        read_request = _read_request
        fast_refusals = _FAST_REFUSALS
        seen = self._seen.add
        supported = self._supported
        add = self._add
        max_lines = self._max_lines
        max_custom_id = self._max_custom_id
        max_model = self._max_model
        n = self._lineno
        tasks = self._tasks
        # The last valid line's group: its url and model, its count so far and its line numbers.
        group = self._group
        group_url = self._group_url
        group_model = self._group_model
        group_count = self._group_count
        group_lines = group.first_lines if group is not None else None
        enter_group = self._enter_group
        max_group_lines = MAX_GROUP_LINES
        dict_ = dict
        body_type = _Body
        valid_body_type = self._valid_body
        str_ = str
        i = start
        # Where the region stops being UTF-8 (stop: nowhere). ASCII is UTF-8: a buffer that is all
        # ASCII (a word-at-a-time check, once: it scans from the buffer's start) needs no decode.
        bad = stop if buf.isascii() else _first_bad_byte(view, start, stop)
        by_line = False  # past a bad line in the region: each line checked alone
        # Where the first line nested deeper than MAX_NESTING starts (-1: none): such a region is read
        # line by line, that line invalid whatever else it holds.
        deep = _first_deep_line(buf, start, stop, MAX_NESTING)
        if _may_hold_a_long_integer(buf, start, stop):
            read_request = _refuse_typed  # json's verdict on it differs from msgspec's: the plain way
            requests = None
        elif deep >= 0:
            requests = None
        else:
            requests = (_read_region(buf, view, start, stop, max_lines - tasks, self._read_valid_lines)
                        if bad == stop and self._read_valid_lines is not None else None)
        if requests is not None and self._take_valid_run(requests):
            return
        if requests is not None:
            # Every line is a request line of the typed shape: no blank line, no bad byte, no
            # line past max_lines; only pending blank lines before the region are left to judge.
            if self._blank_count:
                self._flush_blanks()
            next_request = iter(requests).__next__
        try:
            while True:
                if requests is not None:
                    try:
                        request = next_request()
                    except StopIteration:
                        i = stop
                        break
                    n += 1
                    tasks += 1
                else:
                    if i >= stop:
                        break
                    j = find(b"\n", i, stop)
                    if j < 0:
                        j = stop
                    line_start = i
                    i = j + 1
                    n += 1
                    if by_line:
                        bad = _first_bad_byte(view, line_start, j)
                    too_deep = line_start == deep
                    if too_deep:
                        deep = _first_deep_line(buf, i, stop, MAX_NESTING) if i < stop else -1
                    if bad < j:
                        # This line holds the first bad byte (the lines before it were all UTF-8):
                        # reported once counted, below.
                        request = None
                    elif too_deep:
                        request = None
                        obj, error = _INVALID, _TOO_DEEP
                    else:
                        try:
                            request = read_request(view[line_start:j])
                        except fast_refusals:
                            # Anything msgspec refused, right or wrong, is judged as before.
                            request = None
                            obj, error = _parse_line(str_(view[line_start:j], "utf-8"))
                            if obj is _BLANK:
                                if not self._blank_count:
                                    self._blank_start = n
                                self._blank_count += 1
                                continue
                    if self._blank_count:
                        self._flush_blanks()
                    tasks += 1
                    if tasks > max_lines:
                        self._report_too_many(n)
                        break
                    if bad < j:
                        add(
                            n,
                            INVALID_UTF8,
                            f"line is not valid UTF-8 (byte 0x{buf[bad]:02x} at byte {bad - line_start + 1} of the"
                            " line)",
                        )
                        by_line = True
                        continue
                if request is not None:
                    cid = request.custom_id
                    method = request.method
                    url = request.url
                    body = request.body
                    m = body.model
                else:
                    if obj is _INVALID:
                        add(n, INVALID_JSON_LINE, error)
                        continue
                    if obj.__class__ is not dict_:
                        add(n, INVALID_JSON_LINE, "line must be a JSON object, got " + type(obj).__name__)
                        continue
                    if (where := unpaired_surrogate_at(obj)) is not None:
                        add(
                            n,
                            UNPAIRED_SURROGATE,
                            f"{where} holds an unpaired UTF-16 surrogate escape such as \"\\ud800\":"
                            " valid JSON, but not text UTF-8 can encode; escape whole characters (a high surrogate"
                            " followed by a low one) or write them as UTF-8",
                        )
                        continue
                    cid = obj.get("custom_id")
                    method = obj.get("method")
                    url = obj.get("url")
                    body = obj.get("body")
                    m = body.get("model") if body.__class__ is dict_ else None

                if cid.__class__ is str_ and cid:
                    if len(cid) > max_custom_id:
                        add(
                            n,
                            CUSTOM_ID_TOO_LONG,
                            f"custom_id is {len(cid)} characters long; at most {max_custom_id} are allowed",
                        )
                    else:
                        before = seen(cid, n)
                        if before:
                            add(n, DUPLICATE_CUSTOM_ID, f"custom_id {_show(cid)} is a duplicate of line {before}")
                else:
                    add(
                        n,
                        MISSING_CUSTOM_ID,
                        "custom_id is missing" if cid is None
                        else f"custom_id must be a non-empty string, got {_show(cid)}",
                    )

                if method != "POST":
                    add(
                        n,
                        INVALID_METHOD,
                        "method is missing (must be \"POST\")" if method is None
                        else f"method must be \"POST\", got {_show(method)}",
                    )

                if url == group_url and m == group_model:
                    # The group of the line before (so url and body are valid, model too).
                    group_count += 1
                    if group_count <= max_group_lines:
                        group_lines.append(n)
                    continue
                valid = True
                if url.__class__ is not str_ or url not in supported:
                    valid = False
                    add(
                        n,
                        UNSUPPORTED_URL,
                        "url is missing" if url is None
                        else f"url {_show(url)} is not a supported endpoint "
                        f"(supported: {', '.join(sorted(supported))})",
                    )
                if body.__class__ is not dict_ and body.__class__ is not body_type and body.__class__ is not valid_body_type:
                    add(
                        n,
                        INVALID_BODY,
                        "body is missing" if body is None
                        else f"body must be a JSON object, got {type(body).__name__}",
                    )
                    continue
                if m.__class__ is not str_ or not m:
                    add(
                        n,
                        MISSING_MODEL,
                        "body.model is missing" if m is None
                        else f"body.model must be a non-empty string, got {_show(m)}",
                    )
                    continue
                if len(m) > max_model:
                    add(
                        n,
                        MODEL_TOO_LONG,
                        f"body.model is {len(m)} characters long; at most {max_model} are allowed",
                    )
                    continue
                if not valid:
                    continue
                entered = enter_group(url, m, n)
                if entered is None:
                    continue
                if group is not None:
                    group.count = group_count
                group = entered
                group_url = url
                group_model = m
                group_count = group.count + 1
                group_lines = group.first_lines
                if group_count <= max_group_lines:
                    group_lines.append(n)
        finally:
            self._lineno = n
            self._tasks = tasks
            if group is not None:
                group.count = group_count
            self._group = group
            self._group_url = group_url
            self._group_model = group_model
            self._group_count = group_count
        if self._counting:
            self._count_lines(buf, i, stop)
