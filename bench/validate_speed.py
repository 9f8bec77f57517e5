"""Throughput of JsonlValidator on a realistic ~200 MB OpenAI batch input file.

Writes 50,000 chat-completion request lines (2-4 KB of message text each, some
non-ASCII, newlines and quotes) to a temporary file, then validates it in
256 KiB chunks and prints MB/s and peak RSS.

    .venv/bin/python bench/validate_speed.py [--lines 50000] [--chunk 262144] [--groups 1]

--groups N spreads the lines round-robin over N (url, body.model) groups: the
worst case for the validator's group counting, every line a new group.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

import msgspec  # noqa: E402

from batchgate_server.core.jsonl_validation import JsonlValidator, _read_request, _read_requests  # noqa: E402

# Mostly English prose, like real chat prompts: paragraphs ("\n\n"), some quotes,
# a few accented / CJK words and the odd emoji.
ENGLISH = (
    "the a of to and in is that for it as with was on be by this are or from at an have not "
    "which but they his her all were when there can more one will would been has their if each "
    "about how up out them then she many some so these into other could time two like our what "
    "customer invoice contract clause summary report analysis request response model answer "
    "question review product service payment delivery account support ticket issue policy data "
    "please write explain describe compare list translate classify extract rewrite summarize "
    "following text document email message article paragraph section table code function"
).split(" ")
PUNCT = (".", ",", ",", "?", ":", ";")
RARE = ("café", "naïve", "résumé", "Zürich", "straße", "東京", "数据", "🚀", "—", "’", "'s", "(e.g.)")


def _paragraph(rng: random.Random, size: int) -> str:
    out: list[str] = []
    n = 0
    while n < size:
        r = rng.random()
        if r < 0.012:
            w = rng.choice(RARE)
        elif r < 0.016:
            w = '"' + rng.choice(ENGLISH) + '"'
        elif r < 0.020:
            w = "\n\n"
        else:
            w = rng.choice(ENGLISH)
            if rng.random() < 0.08:
                w += rng.choice(PUNCT)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:size]


def generate(path: Path, lines: int, seed: int = 7, groups: int = 1) -> int:
    rng = random.Random(seed)
    pool = [_paragraph(rng, rng.randint(1600, 3300)) for _ in range(200)]
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for i in range(lines):
            user = rng.choice(pool)
            extra = rng.choice(pool)[: rng.randint(750, 1800)]
            req = {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": "/v1/chat/completions" if i % groups < (groups + 1) // 2 else "/v1/responses",
                "body": {
                    "model": "gpt-4o-mini" if groups == 1 else f"model-{i % groups}",
                    "messages": [
                        {"role": "system", "content": "You are a careful assistant."},
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": "Understood."},
                        {"role": "user", "content": extra},
                    ],
                    "max_tokens": 512,
                    "temperature": 0.2,
                },
            }
            # Python SDK users get ensure_ascii=True, other tools write raw UTF-8.
            f.write(json.dumps(req, ensure_ascii=rng.random() < 0.7))
            f.write("\n")
    return path.stat().st_size


def _parsers() -> dict[str, object]:
    """The JSON machinery the validator could stand on, each as line (str) -> value.
    orjson and pysimdjson are not dependencies: measured when installed."""
    scan = json.JSONDecoder().scan_once
    found = {"json (stdlib C scanner)": lambda line: scan(line, 0),
             "msgspec, untyped": msgspec.json.Decoder().decode,
             "msgspec, typed line schema": _read_request}
    try:
        import orjson
        found["orjson"] = orjson.loads
    except ImportError:
        pass
    try:
        import simdjson
        parser = simdjson.Parser()
        # Lazy: the four fields the rules read are fetched, nothing else is built (and it keeps
        # the first of duplicate keys where json keeps the last: not usable as is).
        found["pysimdjson (4 fields)"] = lambda line: (lambda o: (o["custom_id"], o["method"], o["url"],
                                                                  o["body"]["model"]))(parser.parse(line))
    except ImportError:
        pass
    return found


def _bare(path: Path, chunk_size: int, parse) -> None:
    """The floor a validator on `parse` pays: split lines, decode, parse."""
    rest = b""
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(chunk_size):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                parse(line.decode("utf-8"))


def _bare_regions(path: Path, chunk_size: int) -> None:
    """The floor of the validator's own way: each chunk's complete lines checked for UTF-8 at once and
    read by one typed msgspec decode_lines call."""
    rest = b""
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(chunk_size):
            data = rest + chunk
            stop = data.rfind(b"\n") + 1
            rest = data[stop:]
            region = memoryview(data)[:stop]
            if not data.isascii():
                str(region, "utf-8")
            _read_requests(region)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--groups", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        size = generate(path, args.lines, groups=args.groups)
        os.sync()  # let writeback finish so it does not steal CPU from the timed runs
        mb = size / 1e6
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"file: {mb:.1f} MB, {args.lines} lines in {args.groups} group(s), chunk {args.chunk} B")
        print(f"peak RSS after generation: {rss_before / 1024:.1f} MiB")
        rates: list[float] = []
        parsers = _parsers()
        bare: dict[str, list[float]] = {name: [] for name in parsers}
        regions: list[float] = []
        for _ in range(args.repeat):
            v = JsonlValidator(max_lines=args.lines)
            t0 = time.perf_counter()
            c0 = time.process_time()
            with path.open("rb", buffering=0) as f:
                while chunk := f.read(args.chunk):
                    v.feed(chunk)
            res = v.finish()
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            assert res.ok, res.problems
            assert res.line_count == args.lines
            assert len(res.groups) == args.groups
            rates.append(mb / cpu)
            print(f"validator (reads included): {mb / wall:6.1f} MB/s wall, {mb / cpu:6.1f} MB/s cpu")
            # The bare parsers, interleaved so machine noise hits all alike (CPU time: the
            # machine is shared).
            for name, parse in parsers.items():
                c0 = time.process_time()
                _bare(path, args.chunk, parse)
                bare[name].append(mb / (time.process_time() - c0))
            c0 = time.process_time()
            _bare_regions(path, args.chunk)
            regions.append(mb / (time.process_time() - c0))
        med = sorted(rates)[len(rates) // 2]
        mib = size / (1 << 20)
        print(f"validator: median {med:.1f} MB/s cpu (range {min(rates):.1f}-{max(rates):.1f}),"
              f" {mb / med * 1000 / mib:.2f} ms CPU per MiB")
        floor = sorted(regions)[len(regions) // 2]
        print(f"  bare region UTF-8 check + msgspec typed decode_lines (the validator's floor): median {floor:.1f}"
              f" MB/s cpu; the validator runs at {med / floor:.2f} of it (the rest: the rules and the custom_id index)")
        for name, runs in bare.items():
            print(f"  bare split+decode+{name}: median {sorted(runs)[len(runs) // 2]:.1f} MB/s cpu"
                  f" (range {min(runs):.1f}-{max(runs):.1f})")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS: {rss / 1024:.1f} MiB (grew {(rss - rss_before) / 1024:.1f} MiB while validating)")


if __name__ == "__main__":
    main()
