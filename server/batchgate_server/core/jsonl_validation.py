"""Streaming validation of an OpenAI batch input file (JSONL) while it is uploaded.

Pure and synchronous: feed the upload's chunks in order, then call ``finish()``.
Chunks may split lines anywhere, even inside a multi-byte UTF-8 character.
Memory stays flat: only the current partial line and a ``custom_id -> first line``
map are kept, never the whole file.

Rules follow OpenAI's batch input validation (codes as in its ``errors.data``):

* the file is UTF-8 (``invalid_utf8``, at the line holding the bad byte);
* every non-blank line is one JSON object (``invalid_json_line``). A trailing
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
* ``url`` one of the supported endpoints (``unsupported_url``) and the same on
  every line (``url_mismatch``);
* ``body`` an object (``invalid_body``) whose ``model`` is a non-empty string
  (``missing_model``) of at most ``max_model_chars`` characters
  (``model_too_long``), the same on every line (``model_mismatch``);
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

Performance: complete lines are decoded straight out of each chunk (memoryview
slices, no per-line copy), once each (strict UTF-8, which also finds the bad
line), and the ``str`` goes once through the C JSON scanner; the Python work per
line is a handful of dict lookups. One regex pass over each chunk finds the
lines that may hold an unpaired surrogate escape; only those are walked string
by string. ``bench/validate_speed.py`` measures it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

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
URL_MISMATCH = "url_mismatch"
INVALID_BODY = "invalid_body"
MISSING_MODEL = "missing_model"
MODEL_MISMATCH = "model_mismatch"
EMPTY_FILE = "empty_file"
UNPAIRED_SURROGATE = "unpaired_surrogate"
CUSTOM_ID_TOO_LONG = "custom_id_too_long"
MODEL_TOO_LONG = "model_too_long"

# OpenAI documents no custom_id limit; 512 is the longest string it bounds in a batch
# (a metadata value), far past any id scheme (a UUID is 36, Anthropic allows 64), and
# keeps the custom_id map of a 50,000-line file within a few tens of MB.
MAX_CUSTOM_ID_CHARS = 512
# Model names are short: provider ids, Bedrock ARNs included, stay well under this.
MAX_MODEL_CHARS = 256
TOO_MANY_TASKS = "too_many_tasks"
FILE_TOO_LARGE = "file_too_large"

_JSON_WS = " \t\r\n"


@dataclass
class LineProblem:
    line: int  # 1-based line number (0 for whole-file problems such as empty_file)
    code: str
    message: str


@dataclass
class ValidationResult:
    line_count: int  # request (non-blank) lines, valid or not (past max_lines: all lines)
    endpoint: str  # the single url all lines share ("" if none)
    model: str  # the single body.model all lines share ("" if none)
    problems: list[LineProblem] = field(default_factory=list)  # first max_reported, line order
    total_problems: int = 0  # every problem found

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

_BLANK = object()
_INVALID = object()


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


# Where in the raw text an unpaired surrogate escape may be: a high surrogate escape not
# followed by a low one, a low one not preceded by a high one, or an escaped backslash
# before "ud" (after which the plain reading of the text cannot be trusted: "\\ud800" is
# the letters, not an escape). Escaped pairs (emoji from json.dumps) do not match, so only
# suspicious lines are parsed for it; one regex pass over each chunk, about 1 GB/s.
_SUSPICIOUS_ESCAPE = re.compile(
    rb"\\(?:\\u[dD]"
    rb"|u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\)u[dD][c-fC-F])"
)


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


def _next_suspicious(buf: bytes, start: int, stop: int) -> int:
    """Where the next suspicious escape in ``buf[start:stop]`` starts (``stop`` if none)."""
    match = _SUSPICIOUS_ESCAPE.search(buf, start, stop)
    return match.start() if match else stop


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
        self._seen: dict[str, int] = {}  # custom_id -> line where it first appeared
        self._endpoint: str | None = None
        self._model: str | None = None
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
        self._result = ValidationResult(
            line_count=self._tasks,
            endpoint=self._endpoint or "",
            model=self._model or "",
            problems=list(self._problems),
            total_problems=self._total,
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

    def _check_lines(self, buf: bytes, start: int, stop: int) -> None:
        """Validate the lines in ``buf[start:stop]``.

        Every line there ends with b"\\n", except that a line reaching ``stop`` may not.
        Hot loop: lines are decoded straight out of ``buf`` through a memoryview (no
        per-line bytes copy), once each (strict UTF-8; decoding lines apart keeps
        pure-ASCII lines in CPython's compact 1-byte form), then scanned once by the
        C JSON scanner; everything the valid path needs is a local.
        """
        view = memoryview(buf)
        find = buf.find
        scan = _scan_once
        setdefault = self._seen.setdefault
        supported = self._supported
        add = self._add
        max_lines = self._max_lines
        max_custom_id = self._max_custom_id
        max_model = self._max_model
        next_suspicious = _next_suspicious
        suspicious_at = next_suspicious(buf, start, stop)
        n = self._lineno
        tasks = self._tasks
        endpoint = self._endpoint
        model = self._model
        dict_ = dict
        str_ = str
        i = start
        try:
            while i < stop:
                j = find(b"\n", i, stop)
                if j < 0:
                    j = stop
                raw = view[i:j]
                suspicious = suspicious_at < j
                if suspicious:
                    suspicious_at = next_suspicious(buf, j, stop)
                i = j + 1
                n += 1
                try:
                    line = str_(raw, "utf-8")
                except UnicodeDecodeError as exc:
                    if self._blank_count:
                        self._flush_blanks()
                    tasks += 1
                    if tasks > max_lines:
                        self._report_too_many(n)
                        break
                    add(
                        n,
                        INVALID_UTF8,
                        f"line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)",
                    )
                    continue
                try:
                    obj, end = scan(line, 0)
                    if end != len(line) and line[end:].strip(_JSON_WS):
                        obj, error = _parse_slow(line)
                except (StopIteration, ValueError, RecursionError):
                    obj, error = _parse_slow(line)
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
                if obj is _INVALID:
                    add(n, INVALID_JSON_LINE, error)
                    continue
                if obj.__class__ is not dict_:
                    add(n, INVALID_JSON_LINE, "line must be a JSON object, got " + type(obj).__name__)
                    continue
                if suspicious and (where := unpaired_surrogate_at(obj)) is not None:
                    add(
                        n,
                        UNPAIRED_SURROGATE,
                        f"{where} holds an unpaired UTF-16 surrogate escape such as \"\\ud800\":"
                        " valid JSON, but not text UTF-8 can encode; escape whole characters (a high surrogate"
                        " followed by a low one) or write them as UTF-8",
                    )
                    continue

                cid = obj.get("custom_id")
                if cid.__class__ is str_ and cid:
                    if len(cid) > max_custom_id:
                        add(
                            n,
                            CUSTOM_ID_TOO_LONG,
                            f"custom_id is {len(cid)} characters long; at most {max_custom_id} are allowed",
                        )
                    elif (first := setdefault(cid, n)) != n:
                        add(
                            n,
                            DUPLICATE_CUSTOM_ID,
                            f"custom_id {_show(cid)} is a duplicate of line {first}",
                        )
                else:
                    add(
                        n,
                        MISSING_CUSTOM_ID,
                        "custom_id is missing" if cid is None
                        else f"custom_id must be a non-empty string, got {_show(cid)}",
                    )

                method = obj.get("method")
                if method != "POST":
                    add(
                        n,
                        INVALID_METHOD,
                        "method is missing (must be \"POST\")" if method is None
                        else f"method must be \"POST\", got {_show(method)}",
                    )

                url = obj.get("url")
                if url != endpoint or endpoint is None:
                    if url.__class__ is not str_ or url not in supported:
                        add(
                            n,
                            UNSUPPORTED_URL,
                            "url is missing" if url is None
                            else f"url {_show(url)} is not a supported endpoint "
                            f"(supported: {', '.join(sorted(supported))})",
                        )
                    elif endpoint is None:
                        endpoint = self._endpoint = url
                    else:
                        add(
                            n,
                            URL_MISMATCH,
                            f"url {_show(url)} differs from {_show(endpoint)} used by earlier lines",
                        )

                body = obj.get("body")
                if body.__class__ is not dict_:
                    add(
                        n,
                        INVALID_BODY,
                        "body is missing" if body is None
                        else f"body must be a JSON object, got {type(body).__name__}",
                    )
                    continue
                m = body.get("model")
                if m != model or model is None:
                    if m.__class__ is not str_ or not m:
                        add(
                            n,
                            MISSING_MODEL,
                            "body.model is missing" if m is None
                            else f"body.model must be a non-empty string, got {_show(m)}",
                        )
                    elif len(m) > max_model:
                        add(
                            n,
                            MODEL_TOO_LONG,
                            f"body.model is {len(m)} characters long; at most {max_model} are allowed",
                        )
                    elif model is None:
                        model = self._model = m
                    else:
                        add(
                            n,
                            MODEL_MISMATCH,
                            f"body.model {_show(m)} differs from {_show(model)} used by earlier lines",
                        )
        finally:
            self._lineno = n
            self._tasks = tasks
        if self._counting:
            self._count_lines(buf, i, stop)
