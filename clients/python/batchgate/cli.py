"""`batchgate`: the command line of the batchgate client.

    batchgate run requests.jsonl --model simulated -o results.jsonl
    batchgate files upload|ls|get|download|rm …
    batchgate batches create|ls|get|watch|cancel …
    batchgate usage --by model --since 7d

Built on argparse and plain ANSI output: the client distribution stays grpcio + protobuf (+ the
google.rpc protos), and a progress bar with counts, rate and ETA is a few lines of code — click or
typer and rich or tqdm would add packages for no feature the command needs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from batchgate import _batch_helpers
from batchgate._common import TLS, DownloadVerificationError
from batchgate.client import BatchgateClient
from batchgate.errors import BatchgateError
from batchgate.types import Batch, BatchStatus, File, FilePurpose, UsageGroupBy, _enum_or_number, to_dict

# Exit codes: how the command, and for `run` and `batches watch` the batch, ended.
EXIT_OK = 0              # done; a batch completed with every request answered
EXIT_ERROR = 1           # a call failed (the error is printed with its reason), or a local file problem
EXIT_USAGE = 2           # the command line is wrong (argparse's own code)
EXIT_PARTIAL = 3         # the batch completed, but some requests failed (see the errors file)
EXIT_FAILED = 4          # the batch failed (its errors are printed)
EXIT_EXPIRED = 5         # the batch expired before every request ran
EXIT_CANCELLED = 6       # the batch was cancelled
EXIT_INTERRUPTED = 130   # Ctrl-C: stopped watching, the batch left running

class CommandLineError(Exception):
    """A value on the command line argparse cannot check by itself (exit code 2, as argparse's own)."""


_END_CODES = {BatchStatus.FAILED: EXIT_FAILED, BatchStatus.EXPIRED: EXIT_EXPIRED,
              BatchStatus.CANCELLED: EXIT_CANCELLED, BatchStatus.CANCELLING: EXIT_CANCELLED}


def exit_code_of(batch: Batch) -> int:
    if batch.status == BatchStatus.COMPLETED:
        return EXIT_PARTIAL if batch.request_counts.failed else EXIT_OK
    return _END_CODES.get(batch.status, EXIT_ERROR)


# -- output ------------------------------------------------------------------------------------

class Output:
    """Human text on stdout, or with --json one JSON document (watch: one per line) for scripts.
    Progress and notes go to stderr, so stdout stays parseable."""

    def __init__(self, as_json: bool, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> None:
        self.as_json = as_json
        self.stdout, self.stderr = stdout, stderr

    def data(self, value: Any, text: Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(value, ensure_ascii=False), file=self.stdout, flush=True)
        else:
            print(text(), file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def error(self, err: BaseException) -> None:
        if isinstance(err, BatchgateError):
            lines = [f"error: {err}"]
            shown = {k: v for k, v in err.metadata.items() if k != "omitted_violations"}
            if shown:
                lines.append("  " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
            if err.retry_delay is not None:
                lines.append(f"  retry after {err.retry_delay.total_seconds():g} s")
            if err.lines:
                more = f" (and {err.omitted_violations} more problems)" if err.omitted_violations else ""
                lines.append(f"what to do: fix line{'s' if len(set(err.lines)) > 1 else ''}"
                             f" {', '.join(map(str, sorted(set(err.lines))))} of the file{more}, then upload it again")
            elif err.hint:
                lines.append(f"what to do: {err.hint}")
            self.note("\n".join(lines))
            if self.as_json:
                self.data({"error": {"code": err.code().name, "reason": err.reason, "domain": err.domain,
                                     "message": err.message, "metadata": err.metadata,
                                     "violations": [{"field": v.field, "line": v.line, "description": v.description}
                                                    for v in err.violations],
                                     "omitted_violations": err.omitted_violations,
                                     "retry_delay_seconds": err.retry_delay.total_seconds()
                                     if err.retry_delay is not None else None}}, str)
        else:
            self.note(f"error: {err}")
            if self.as_json:
                self.data({"error": {"code": type(err).__name__, "message": str(err)}}, str)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; the columns in `right` (numbers) aligned right."""
    cells = [list(map(str, header))] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = set(right)
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in cells)


def _when(value: datetime.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe_file(f: File) -> str:
    rows = [("id", f.id), ("filename", f.filename), ("purpose", f.purpose), ("bytes", f"{f.bytes:,}"),
            ("lines", f"{f.line_count:,}"), ("endpoint", f.endpoint), ("model", f.model)]
    if len(f.groups) > 1:  # a mixed file: its lines by endpoint and model
        rows += [("groups" if i == 0 else "", f"{g.count:,} {g.endpoint} {g.model}") for i, g in enumerate(f.groups)]
    rows += [("sha256", f.sha256), ("created", _when(f.created_at)), ("expires", _when(f.expires_at) or "never")]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def describe_batch(b: Batch) -> str:
    c = b.request_counts
    rows = [("id", b.id), ("status", b.status), ("model", f"{b.model} ({b.provider})"), ("endpoint", b.endpoint),
            ("requests", f"{c.completed:,} completed, {c.failed:,} failed, {c.total:,} in all"),
            ("input file", b.input_file_id), ("output file", b.output_file_id), ("error file", b.error_file_id),
            ("created", _when(b.created_at)), ("ended", _when(b.completed_at or b.failed_at or b.expired_at
                                                              or b.cancelled_at)),
            ("tokens", f"{b.usage.input_tokens:,} in, {b.usage.output_tokens:,} out" if b.usage.total_tokens else ""),
            ("cost", _cost(b)), ("metadata", ", ".join(f"{k}={v}" for k, v in sorted(b.metadata.items())))]
    lines = [f"{k:<11} {v}" for k, v in rows if v]
    lines += [f"error       {e.code}: {e.message}" + (f" (line {e.line})" if e.HasField("line") else "")
              for e in b.errors]
    # A batch run as several provider jobs: one line each, for operators.
    lines += [f"job         {s.id} {_enum_or_number(BatchStatus, s.status)} on {s.deployment_id} ({s.provider}"
              + (f" {s.provider_job_id}" if s.provider_job_id else "") + f"): {s.request_counts.completed:,} "
              f"completed, {s.request_counts.failed:,} failed, {s.request_counts.total:,} in all" for s in b.shards]
    return "\n".join(lines)


def _cost(b: Batch) -> str:
    cost = b.cost
    if cost.amount:
        return f"{cost.amount} {cost.currency}"
    return f"unknown ({cost.reason})" if cost.reason else ""


# -- progress ----------------------------------------------------------------------------------

class Progress:
    """A live bar on a terminal (counts, rate, ETA, failures); elsewhere a line per status change
    and one every `every` seconds, so a log shows the batch moving without a line per update."""

    def __init__(self, stream: TextIO, *, every: float = 10.0, width: int = 30) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.every, self.width = every, width
        self._start: tuple[float, int] | None = None
        self._printed_at = 0.0
        self._status: Any = None
        self._drawn = False

    def update(self, batch: Batch) -> None:
        now = time.monotonic()
        c = batch.request_counts
        done = c.completed + c.failed
        if self._start is None:
            self._start = (now, done)
        elapsed = now - self._start[0]
        rate = (done - self._start[1]) / elapsed if elapsed > 0.5 else 0.0
        eta = (c.total - done) / rate if rate > 0 and c.total > done else None
        text = (f"{str(batch.status):<11} {self._bar(done, c.total)} {done:,}/{c.total:,}"
                + (f"  {rate:,.0f} req/s" if rate else "") + (f"  ETA {_duration(eta)}" if eta is not None else "")
                + (f"  failed {c.failed:,}{_by_code(batch)}" if c.failed else ""))
        changed = batch.status != self._status
        self._status = batch.status
        if self.live:
            if changed or now - self._printed_at >= 0.1 or batch.done:
                print(f"\r\x1b[2K{text}", end="", file=self.stream, flush=True)
                self._printed_at, self._drawn = now, True
        elif changed or now - self._printed_at >= self.every or batch.done:
            print(text, file=self.stream, flush=True)
            self._printed_at = now

    def _bar(self, done: int, total: int) -> str:
        filled = int(self.width * done / total) if total else 0
        return "[" + "#" * filled + "." * (self.width - filled) + "]"

    def finish(self) -> None:
        if self._drawn:
            print(file=self.stream, flush=True)
            self._drawn = False


def _by_code(batch: Batch, most: int = 3) -> str:
    """The live failure summary (the built-in executor reports one while the batch runs):
    " (http_429 12, request_timeout 3, …)"."""
    failures = list(batch.failures)
    if not failures:
        return ""
    shown = ", ".join(f"{f.code} {f.count:,}" for f in failures[:most])
    return f" ({shown}{', …' if len(failures) > most else ''})"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


# -- commands ----------------------------------------------------------------------------------

def _show(out: Output, record: File | Batch, describe: Callable[[Any], str]) -> int:
    out.data(to_dict(record), lambda: describe(record))
    return EXIT_OK


def cmd_files_upload(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    return _show(out, bg.upload_file(args.path, purpose=int(FilePurpose.parse(args.purpose)),
                                     request_id=args.request_id, expires_after_seconds=args.expires_after),
                 describe_file)


def _limited(items: Iterable[Any], limit: int) -> list[Any]:
    taken = []
    for item in items:
        if limit and len(taken) >= limit:
            break
        taken.append(item)
    return taken


def cmd_files_ls(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    purpose = int(FilePurpose.parse(args.purpose)) if args.purpose else 0
    files = _limited(bg.list_files(purpose=purpose), args.limit)
    out.data([to_dict(f) for f in files], lambda: table(
        [(f.id, f.filename, f.purpose, _size(f.bytes), f"{f.line_count:,}", _when(f.created_at)) for f in files],
        ["ID", "FILENAME", "PURPOSE", "SIZE", "LINES", "CREATED"], right=(3, 4)) if files else "no files")
    return EXIT_OK


def cmd_files_get(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    return _show(out, bg.get_file(args.file_id), describe_file)


def cmd_files_download(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    if args.output == "-":
        for data in bg.iter_file(args.file_id):
            sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    path = Path(args.output or bg.get_file(args.file_id).filename)
    written = bg.download_file(args.file_id, path, resume=args.resume)
    out.data({"file_id": args.file_id, "path": str(path), "bytes_received": written},
             lambda: f"downloaded {args.file_id} to {path} ({written:,} bytes)")
    return EXIT_OK


def cmd_files_rm(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    results = {file_id: bg.delete_file(file_id) for file_id in args.file_ids}
    out.data([{"file_id": k, "deleted": v} for k, v in results.items()],
             lambda: "\n".join(f"deleted {k}" if v else f"{k} was already gone" for k, v in results.items()))
    return EXIT_OK


def _metadata(pairs: Sequence[str], flag: str = "--metadata") -> dict[str, str]:
    """KEY=VALUE arguments of a repeatable flag as a dict."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandLineError(f"{flag} takes {'FILE_MODEL=MODEL' if flag == '--model-map' else 'KEY=VALUE'},"
                                   f" not {pair!r}")
        result[key] = value
    return result


def cmd_batches_create(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    # No --endpoint: the server takes the file's own (each, for a file that mixes them).
    return _show(out, bg.create_batch(args.input_file_id, args.endpoint or "",
                                      completion_window=args.completion_window, metadata=_metadata(args.metadata),
                                      model=args.model, provider=args.provider, request_id=args.request_id,
                                      model_map=_metadata(args.model_map, "--model-map"), spread=args.spread),
                 describe_batch)


def cmd_batches_ls(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    statuses = [int(BatchStatus.parse(s)) for s in args.status]
    batches = _limited(bg.list_batches(statuses=statuses), args.limit)
    out.data([to_dict(b) for b in batches], lambda: table(
        [(b.id, b.status, b.model, f"{b.request_counts.completed:,}", f"{b.request_counts.failed:,}",
          f"{b.request_counts.total:,}", _when(b.created_at)) for b in batches],
        ["ID", "STATUS", "MODEL", "DONE", "FAILED", "TOTAL", "CREATED"], right=(3, 4, 5)) if batches else "no batches")
    return EXIT_OK


def cmd_batches_get(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    return _show(out, bg.get_batch(args.batch_id), describe_batch)


def cmd_batches_cancel(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    return _show(out, bg.cancel_batch(args.batch_id), lambda b: f"{b.id} is {b.status}")


def cmd_batches_watch(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    try:
        final = _follow(bg, args.batch_id, out, json_states=out.as_json)
    except KeyboardInterrupt:
        out.note(f"\nstopped watching; {args.batch_id} keeps running. Watch again: batchgate batches watch"
                 f" {args.batch_id}")
        return EXIT_INTERRUPTED
    if args.output:
        return _finish(bg, final, Path(args.output), out, started=None)
    if not out.as_json:
        out.data(None, lambda: describe_batch(final))
    return exit_code_of(final)


def _follow(bg: BatchgateClient, batch_id: str, out: Output, *, json_states: bool) -> Batch:
    """Watch to the end with a progress bar on stderr; `json_states` prints every state as a JSON
    line on stdout as well."""
    progress = Progress(out.stderr)
    final = None
    try:
        for final in bg.watch(batch_id):
            if json_states:
                out.data(to_dict(final), str)
            progress.update(final)
    finally:
        progress.finish()
    return final if final is not None else bg.get_batch(batch_id)


def _group_flags(by: Sequence[str]) -> tuple[list[int], str]:
    """--by values: project, api_key, model, provider, metadata:KEY."""
    groups, metadata_key = [], ""
    for item in (part for value in by for part in value.split(",") if part):
        name, _, key = item.partition(":")
        if name == "metadata":
            if not key:
                raise CommandLineError("--by metadata needs a key: --by metadata:team")
            metadata_key = key
            groups.append(int(UsageGroupBy.METADATA_KEY))
        else:
            try:
                groups.append(int(UsageGroupBy.parse(name)))
            except ValueError:
                raise CommandLineError(f"--by {name!r}: choose project, api_key, model, provider or"
                                 " metadata:KEY") from None
    return groups, metadata_key


_RELATIVE = re.compile(r"^(\d+)([mhdw])$")


def parse_time(text: str | None) -> datetime.datetime | None:
    """ISO 8601 (a date, or a date and time; no zone means UTC), or a span back from now: 30m, 12h, 7d, 2w."""
    if not text:
        return None
    if match := _RELATIVE.match(text):
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
        return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(**{unit: int(match.group(1))})
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandLineError(f"{text!r} is neither an ISO 8601 time nor a span such as 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def cmd_usage(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    groups, metadata_key = _group_flags(args.by)
    report = bg.query_usage(start_time=parse_time(args.since), end_time=parse_time(args.until), group_by=groups,
                            metadata_key=metadata_key, project=args.project, model=args.model,
                            provider=args.provider)
    keys = [{"project": "project", "api_key": "api_key_id", "model": "model", "provider": "provider"}.get(
        str(UsageGroupBy(g)), f"metadata.{metadata_key}") for g in groups]

    def row(r, label: list[str]) -> list[Any]:
        unknown = f" (+{r.unknown_cost_batches} unknown)" if r.unknown_cost_batches else ""
        return [*label, f"{r.batch_count:,}", f"{r.input_tokens:,}", f"{r.cached_input_tokens:,}",
                f"{r.output_tokens:,}", f"{r.reasoning_tokens:,}", f"{r.cost_amount or '0'} {r.currency}{unknown}"]

    def text() -> str:
        header = [k.upper() for k in keys] or [""]
        rows = [row(r, [r.group.get(k, "(none)") for k in keys]) for r in report.rows] if keys else []
        rows.append(row(report.totals, ["TOTAL"] + [""] * (len(header) - 1)))
        return table(rows, [*header, "BATCHES", "INPUT", "CACHED", "OUTPUT", "REASONING", "COST"],
                     right=range(len(header), len(header) + 6))

    out.data({"rows": [to_dict(r) for r in report.rows], "totals": to_dict(report.totals)}, text)
    return EXIT_OK


def cmd_run(bg: BatchgateClient, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    if not args.model and not args.model_map:
        raise CommandLineError("run takes --model (what every line runs on), or --model-map FILE_MODEL=MODEL"
                               " (lines of models not mapped then run on their own body.model)")
    model_map = _metadata(args.model_map, "--model-map")  # checked before anything is uploaded
    source = Path(args.requests)
    if not source.is_file():
        out.error(FileNotFoundError(f"{source}: no such file"))
        return EXIT_ERROR
    f = bg.upload_file(source)
    out.note(f"uploaded {source} as {f.id}: {f.line_count:,} requests for {f.endpoint or 'several endpoints'}")
    b = bg.create_batch(f.id, args.endpoint or f.endpoint, model=args.model, provider=args.provider,
                        completion_window=args.completion_window, metadata=_metadata(args.metadata),
                        model_map=model_map, spread=args.spread)
    out.note(f"created {b.id} on {b.model or 'several models'} ({b.provider or 'several providers'})")
    try:
        final = _follow(bg, b.id, out, json_states=False)  # its JSON is the summary
    except KeyboardInterrupt:
        return _interrupted(bg, b, Path(args.output or _default_output(source)), out)
    return _finish(bg, final, Path(args.output or _default_output(source)), out, started=started)


def _default_output(source: Path) -> Path:
    return source.with_name(source.stem + ".results.jsonl")


def _interrupted(bg: BatchgateClient, b: Batch, output: Path, out: Output) -> int:
    """Ctrl-C while watching: ask whether to cancel (only someone at a terminal can answer; a script's
    interrupt leaves the batch running) and say how to pick it up again."""
    answer = ""
    if sys.stdin.isatty():
        print(f"\ncancel batch {b.id}? [y/N] ", end="", file=out.stderr, flush=True)  # stdout may be --json
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            answer = ""
    if answer.strip().lower() in ("y", "yes"):
        cancelled = bg.cancel_batch(b.id)
        out.note(f"{b.id} is {cancelled.status}")
        if out.as_json:
            out.data({"batch": to_dict(cancelled), "interrupted": True}, str)
        return EXIT_CANCELLED
    out.note(f"\n{b.id} keeps running. Resume watching (and download the results) with:\n"
             f"  batchgate batches watch {b.id} -o {output}")
    if out.as_json:
        out.data({"batch": to_dict(bg.get_batch(b.id)), "interrupted": True,
                  "resume": f"batchgate batches watch {b.id} -o {output}"}, str)
    return EXIT_INTERRUPTED


def _failures_by_code(data: bytes) -> Counter:
    """Error file lines by code, named as the server's live summary (Batch.failures) names them:
    "http_<status>" for an HTTP error answer, else the line's error.code."""
    codes: Counter = Counter()
    for raw in data.splitlines():
        _, status, _, error = _batch_helpers.parse_result_line(raw)
        codes[f"http_{status}" if status else str((error or {}).get("code") or "unknown")] += 1
    return codes


def _finish(bg: BatchgateClient, final: Batch, output: Path, out: Output, *, started: float | None) -> int:
    """Download the results (and the errors beside them), print the summary, exit by the batch's end."""
    written = {}
    if final.output_file_id:
        bg.download_file(final.output_file_id, output)
        written["output"] = str(output)
    failures: Counter = Counter()
    if final.error_file_id:
        errors_path = output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
        bg.download_file(final.error_file_id, errors_path)
        written["errors"] = str(errors_path)
        failures = _failures_by_code(errors_path.read_bytes())
    code = exit_code_of(final)
    elapsed = time.monotonic() - started if started is not None else None

    def text() -> str:
        c = final.request_counts
        lines = [f"batch {final.id} {final.status}: {c.completed:,} completed, {c.failed:,} failed of {c.total:,}"
                 + (f" in {_duration(elapsed)}" if elapsed is not None else "")]
        if failures:
            lines.append("failures by code: " + ", ".join(f"{k} {v:,}" for k, v in failures.most_common()))
        lines += [f"  {e.code}: {e.message}" + (f" (line {e.line})" if e.HasField("line") else "")
                  for e in final.errors]
        if final.usage.total_tokens:
            lines.append(f"tokens: {final.usage.input_tokens:,} in, {final.usage.output_tokens:,} out;"
                         f" cost {_cost(final) or 'pending'}")
        lines += [f"{kind}: {path}" for kind, path in written.items()]
        return "\n".join(lines)

    out.data({"batch": to_dict(final), "files": written, "failures_by_code": dict(failures), "exit_code": code,
              "elapsed_seconds": elapsed}, text)
    return code


# -- the parser --------------------------------------------------------------------------------

def _connection_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after its name. On the subcommands their
    defaults are suppressed, so that a value given before the subcommand is not reset."""
    d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    env = os.environ.get
    p.add_argument("--address", default=d(env("BATCHGATE_ADDRESS") or "127.0.0.1:50051"),
                   help="server host:port [BATCHGATE_ADDRESS]")
    p.add_argument("--api-key", default=d(env("BATCHGATE_API_KEY")), help="API key [BATCHGATE_API_KEY]")
    p.add_argument("--tls", action="store_true", default=d(env("BATCHGATE_TLS", "").lower() in ("1", "true", "yes")),
                   help="use TLS with the system's CAs [BATCHGATE_TLS=1]")
    p.add_argument("--tls-ca", default=d(env("BATCHGATE_TLS_CA")), help="PEM CAs to trust (implies --tls)"
                   " [BATCHGATE_TLS_CA]")
    p.add_argument("--tls-client-cert", default=d(env("BATCHGATE_TLS_CLIENT_CERT")),
                   help="PEM client certificate for mutual TLS [BATCHGATE_TLS_CLIENT_CERT]")
    p.add_argument("--tls-client-key", default=d(env("BATCHGATE_TLS_CLIENT_KEY")),
                   help="PEM key of the client certificate [BATCHGATE_TLS_CLIENT_KEY]")
    p.add_argument("--tls-server-name", default=d(env("BATCHGATE_TLS_SERVER_NAME")),
                   help="check the server certificate for this name [BATCHGATE_TLS_SERVER_NAME]")
    p.add_argument("--timeout", type=float, default=d(60.0), help="seconds for each call (default 60)")
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchgate", description="Run and manage batches on a batchgate server.",
        epilog="exit codes: 0 done (batch completed, nothing failed), 1 a call failed, 2 bad command line,"
               " 3 completed with failed requests, 4 batch failed, 5 expired, 6 cancelled,"
               " 130 interrupted (batch left running)")
    _connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, defaults=False)

    def leaf(group, name: str, handler, help: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    run = leaf(commands, "run", cmd_run, "upload a JSONL file, run it as a batch, watch it, download the results")
    run.add_argument("requests", help="the OpenAI-format batch file (JSONL)")
    run.add_argument("--model", default="", help="model to run on (a model_name, provider/model, simulated);"
                                                  " required unless --model-map is given")
    run.add_argument("-o", "--output", help="where the results go (default: <requests>.results.jsonl);"
                                            " failed requests go to <output>.errors.jsonl")
    run.add_argument("--endpoint", help="default: the endpoint of the file's lines")
    run.add_argument("--provider", default="")
    run.add_argument("--completion-window", default="24h")
    run.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    _routing_options(run)

    files = commands.add_parser("files", help="upload, list, get, download, delete files").add_subparsers(
        dest="files_command", required=True, metavar="ACTION")
    p = leaf(files, "upload", cmd_files_upload, "upload a file")
    p.add_argument("path")
    p.add_argument("--purpose", default="batch", help="batch (default) or batch_output")
    p.add_argument("--expires-after", type=int, metavar="SECONDS")
    p.add_argument("--request-id", default="", help="idempotency key (default: one made up)")
    p = leaf(files, "ls", cmd_files_ls, "list files, newest first")
    p.add_argument("--purpose", default="")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    leaf(files, "get", cmd_files_get, "show a file record").add_argument("file_id")
    p = leaf(files, "download", cmd_files_download, "download a file (verified against its sha256)")
    p.add_argument("file_id")
    p.add_argument("-o", "--output", help="path, or - for stdout (default: the file's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted download (<path>.part)")
    leaf(files, "rm", cmd_files_rm, "delete files").add_argument("file_ids", nargs="+", metavar="file_id")

    batches = commands.add_parser("batches", help="create, list, get, watch, cancel batches").add_subparsers(
        dest="batches_command", required=True, metavar="ACTION")
    p = leaf(batches, "create", cmd_batches_create, "create a batch from an uploaded file")
    p.add_argument("input_file_id")
    p.add_argument("--endpoint", help="default: the endpoint of the file's lines")
    p.add_argument("--model", default="")
    p.add_argument("--provider", default="")
    _routing_options(p)
    p.add_argument("--completion-window", default="24h")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--request-id", default="", help="idempotency key (default: one made up)")
    p = leaf(batches, "ls", cmd_batches_ls, "list batches, newest first")
    p.add_argument("--status", action="append", default=[], help="only these statuses (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    leaf(batches, "get", cmd_batches_get, "show a batch").add_argument("batch_id")
    p = leaf(batches, "watch", cmd_batches_watch, "follow a batch to its end (exit code: how it ended)")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", help="download the results here when it ends")
    leaf(batches, "cancel", cmd_batches_cancel, "cancel a batch").add_argument("batch_id")

    p = leaf(commands, "usage", cmd_usage, "usage and cost of ended batches, grouped")
    p.add_argument("--by", action="append", default=[],
                   help="group by project, api_key, model, provider or metadata:KEY (repeatable, or comma-separated)")
    p.add_argument("--since", help="ISO 8601 time or a span back from now (7d, 12h)")
    p.add_argument("--until", help="ISO 8601 time or a span back from now")
    p.add_argument("--project", default="")
    p.add_argument("--model", default="")
    p.add_argument("--provider", default="")
    return parser


def _routing_options(p: argparse.ArgumentParser) -> None:
    """CreateBatch's model_map and spread, as `batches create` and `run` take them."""
    p.add_argument("--model-map", action="append", default=[], metavar="FILE_MODEL=MODEL",
                   help="run the lines of FILE_MODEL (their body.model) on MODEL: a model name, provider/model or"
                        " deployment id (repeatable)")
    p.add_argument("--spread", action="store_true",
                   help="cut the batch across every deployment of its model, by weight and free capacity")


def client_from_args(args: argparse.Namespace) -> BatchgateClient:
    tls = None
    if args.tls or args.tls_ca or args.tls_client_cert or args.tls_client_key or args.tls_server_name:
        tls = TLS(root_certificates=args.tls_ca, client_certificate=args.tls_client_cert,
                  client_key=args.tls_client_key, server_name=args.tls_server_name)
    return BatchgateClient(args.address, args.api_key or "", timeout=args.timeout, tls=tls)


def run_cli(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args.json, stdout or sys.stdout, stderr or sys.stderr)
    try:
        with client_from_args(args) as bg:
            return args.handler(bg, args, out)
    except (CommandLineError, ValueError) as err:  # ValueError: an enum name or TLS option that is no such thing
        print(f"batchgate: {err}", file=out.stderr)
        return EXIT_USAGE
    except (BatchgateError, DownloadVerificationError, OSError) as err:
        out.error(err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        out.note("interrupted")
        return EXIT_INTERRUPTED


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
