"""core/_jsonl_native.c, the validator's two per-line loops in C, held to their Python versions in
core/jsonl_validation.py (and to a dict), on hostile input, with its limits and its memory."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc

import pytest

from batchgate_server.core import jsonl_validation
from batchgate_server.core.jsonl_validation import _CustomIdIndex, _object_lines_in_python



def test_the_native_part_is_built():
    # The server validates without it, ~2.5x slower: a test environment that lost the build (pip
    # install -e . compiles it) fails here rather than passing slowly.
    from batchgate_server.core import _jsonl_native
    assert jsonl_validation._NativeIndex is _jsonl_native.CustomIdIndex
    assert jsonl_validation._object_lines is _jsonl_native.object_lines


def _native():
    from batchgate_server.core import _jsonl_native
    return _jsonl_native


def _ids_in_one_bucket(count: int, prefix: str) -> list[str]:
    mask = (1 << _CustomIdIndex._BUCKET_BITS) - 1
    ids, n = [], 0
    while len(ids) < count:
        n += 1
        if hash(f"{prefix}{n}") & mask == 0x123:
            ids.append(f"{prefix}{n}")
    return ids


@pytest.mark.parametrize("seed", range(4))
def test_the_index_reports_what_a_dict_would_as_the_python_index_does(seed):
    rng = random.Random(seed)
    # ASCII, Latin-1, BMP and astral ids (the four string kinds), ids sharing one array, empty and long ids.
    pool = ([f"id-{i}" for i in range(300)] + [f"café-{i}" for i in range(50)] + [f"東京-{i}" for i in range(50)]
            + [f"🚀{i}" for i in range(50)] + _ids_in_one_bucket(200, "b") + ["", "x" * 5000])
    order = [rng.choice(pool) for _ in range(3000)]
    first: dict[str, int] = {}
    expected = []
    for line, cid in enumerate(order, 1):
        if cid in first:
            expected.append((line, cid, first[cid]))
        else:
            first[cid] = line
    index = _native().CustomIdIndex(rng.getrandbits(64))
    reference = _CustomIdIndex(max_line=10_000)
    # In runs of random length, some of one id: add_run, and add for the runs of one.
    got, line = [], 1
    while line <= len(order):
        run = order[line - 1:line - 1 + rng.choice((1, 1, 7, 100, 1000))]
        if len(run) == 1:
            before = index.add(run[0], line)
            got += [(line, run[0], before)] if before else []
        else:
            got += index.add_run(run, line)
        line += len(run)
    assert got == expected
    assert reference.add_run(order, 1) == expected
    assert len(index) == len(first)


def test_the_index_refuses_what_is_not_a_str_or_a_line():
    index = _native().CustomIdIndex(7)

    class Sneaky(str):
        def __hash__(self):  # Python code inside the C loop: refused, not run
            raise AssertionError("ran")

    for bad in (b"bytes", 5, None, Sneaky("s")):
        with pytest.raises(TypeError):
            index.add(bad, 1)
        with pytest.raises(TypeError):
            index.add_run(["ok", bad], 1)
    with pytest.raises(TypeError):
        index.add_run(("a", "tuple"), 1)
    for line in (0, -1, 2**32, 2**70):
        with pytest.raises(OverflowError):
            index.add("x", line)
    with pytest.raises(OverflowError):
        index.add_run(["a", "b"], 2**32 - 1)  # its second line is past 32 bits
    for first in (2**64 - 1, 2**64 - 2):  # first + count wraps past 2**64: refused all the same
        with pytest.raises(OverflowError):
            index.add_run(["a", "b", "c"], first)
    with pytest.raises(TypeError):
        _native().CustomIdIndex("seed")
    # What was refused left nothing behind; what was taken before a refusal stays.
    assert len(index) == 1 and index.add("ok", 9) == 1


def test_a_validator_past_32_bit_lines_uses_the_python_index():
    assert isinstance(jsonl_validation._new_index(2**32), _CustomIdIndex)
    assert isinstance(jsonl_validation._new_index(2**32 - 1), _native().CustomIdIndex)


def test_the_index_holds_about_twelve_bytes_an_id():
    ids = [f"request-{i}-{'x' * (i % 40)}" for i in range(200_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = _native().CustomIdIndex(1)
        for start in range(0, len(ids), 1000):
            assert index.add_run(ids[start:start + 1000], start + 1) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 12 bytes an id, arrays grown by half again when full: at most ~18, whatever the ids' length.
    assert 12 * len(ids) <= held < 19 * len(ids), held / len(ids)
    assert len(index) == len(ids)


@pytest.mark.parametrize("seed", range(3))
def test_object_lines_counts_as_the_python_loop_does(seed):
    rng = random.Random(seed)
    alphabet = b'{}\r\n "a:,[]'
    lines = 0
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.5:
                parts.append(b"{" + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 6))).replace(b"\n", b"")
                             + rng.choice((b"}", b"}\r", b"\r", b"", b"}}")) + b"\n")
            else:
                parts.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) + b"\n")
        buf = b"junk" + b"".join(parts)
        got = _native().object_lines(buf, 4, len(buf))
        assert got == _object_lines_in_python(buf, 4, len(buf)), buf
        lines += got > 0
    assert lines > 100  # the random regions were often all objects: both answers were tried


def test_object_lines_refuses_a_region_that_does_not_end_its_line_or_lies_outside_the_buffer():
    object_lines = _native().object_lines
    assert object_lines(b'{}\n{"a":1}\r\n', 0, 12) == 2
    assert object_lines(b'{}\n{"a":1}', 0, 10) == -1  # the last line is not ended
    assert object_lines(b"{\r\n", 0, 3) == -1 and object_lines(b"{}\r\n", 0, 4) == 1
    assert object_lines(memoryview(b"x{}\n"), 1, 4) == 1
    for start, stop in ((0, 0), (-1, 3), (0, 5), (3, 2)):
        with pytest.raises(ValueError):
            object_lines(b"{}\n", start, stop)
    with pytest.raises(TypeError):
        object_lines("{}\n", 0, 3)


def _other_kind_twin(text: str) -> str:
    """A different str whose canonical bytes are those of ASCII `text` (even length): two ASCII
    characters become one UCS-2 code unit ("ab" -> U+6261). hash() hashes those bytes, so the two
    hash alike under every key."""
    return text.encode().decode("utf-16-le")


def test_ids_of_other_kinds_with_the_same_bytes_are_not_duplicates():
    # The C index took hash() and an FNV hash of the same bytes, so "ab" was a duplicate of "\u6261"
    # every time; the Python index kept 12 bits of a second hash apart, so 1 in 4096 such pairs was.
    rng = random.Random(8)
    ids = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-") for _ in range(12)) for _ in range(20_000)]
    twins = [_other_kind_twin(cid) for cid in ids]
    # Latin-1 against UCS-2, UCS-4 against UCS-2: the same bytes in other kinds.
    ids += ["\xff\xff", "\U0001f680"]
    twins += ["\uffff", "\uf680\x01"]
    assert all(hash(a) == hash(b) and a != b for a, b in zip(ids, twins))
    for index in (_native().CustomIdIndex(random.getrandbits(64)), _CustomIdIndex(max_line=100_000)):
        assert index.add_run(ids + twins, 1) == []
        # and each is still a duplicate of itself
        assert [line for line, _, _ in index.add_run([twins[5], ids[5]], 50_000)] == [50_000, 50_001]


def test_a_file_whose_ids_share_their_bytes_with_others_is_valid():
    ids = ["ab", "\u6261", "requests", _other_kind_twin("requests"), "\xff\xff", "\uffff"]
    data = b"".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "m"}}, ensure_ascii=False).encode() + b"\n" for cid in ids)
    for chunks in ([data], [data[:40], data[40:]]):
        validator = jsonl_validation.JsonlValidator()
        for chunk in chunks:
            validator.feed(chunk)
        result = validator.finish()
        assert result.ok, result.problems
        assert result.line_count == len(ids)


def test_a_collection_inside_add_run_that_changes_the_list_takes_no_line_past_the_checked_ones():
    # add_run's tuples (one a duplicate) can start a garbage collection, and a finalizer then runs
    # Python code: here it swaps the list's ids for 10,000 others. add_run read past the 300 lines
    # it had checked against 2**32 (the lines it held wrapped to small numbers), and it used the id
    # it had borrowed from the list after the finalizer freed it (ASAN: heap-use-after-free).
    index = _native().CustomIdIndex(5)
    ids = ["".join(["dup", str(i % 3)]) for i in range(300)]
    calls = []

    class Rearm:  # collected at add_run's first allocation: leaves a Swap to collect at the next
        def __del__(self):
            calls.append("rearm")
            swap = Swap()
            swap.cycle = swap

    class Swap:
        def __del__(self):
            calls.append("swap")
            ids[:] = ["".join(["new", str(k)]) for k in range(10_000)]

    threshold = gc.get_threshold()
    gc.disable()
    try:
        # Lists and small tuples come from free lists, which allocate nothing and so start no
        # collection: empty both first (kept alive until after the call), whatever ran before.
        drained = ([(k, k, k) for k in range(5000)], [[] for _ in range(500)])
        rearm = Rearm()
        rearm.cycle = rearm
        del rearm
        gc.set_threshold(1, 1000, 1000)
        gc.enable()
        first = 2**32 - 400
        found = index.add_run(ids, first)
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
    del drained
    assert calls == ["rearm", "swap"]  # the list did change inside the call
    assert found and all(first <= line < first + 300 for line, _, _ in found)
    assert all(cid.startswith("dup") for _, cid, _ in found[:3])
    assert len(index) <= 300
