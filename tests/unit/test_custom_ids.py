"""CustomIdCodec: provider-safe ids that always map back to the caller's custom_id."""

from __future__ import annotations

import json
import random
import re

import pytest

from batchgate_server.providers.custom_ids import (
    RESERVED_PREFIX,
    CustomIdCodec,
    anthropic_codec,
    bedrock_codec,
    vertex_codec,
)

ANTHROPIC_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
VERTEX_RE = re.compile(r"^[a-z0-9_-]{1,63}$")

HOSTILE = [
    "",
    " ",
    "  ",
    "\t",
    "with space",
    "naïve-café",
    "日本語のID",
    "😀",
    "a/b",
    "../../etc/passwd",
    "id:1",
    "a.b",
    "x" * 65,
    "y" * 500,
    "bgl_3",
    "bgl_0",
    "BGL_5",
    "Bgl_7",
    "bgl_",
    "bgl_bgl_1",
    "trailing\n",
    "nul\x00byte",
    "emoji-😀-64" + "z" * 60,
    "\u200bzero-width",
    "request-1\u0301",
]
FITTING = ["request-1", "req_2", "A-Z_a-z_0-9", "x" * 64, "0", "-", "_", "bg_1", "bglx_1",
           "xbgl_1"]


@pytest.fixture(params=["anthropic", "bedrock", "vertex"])
def codec_and_re(request: pytest.FixtureRequest) -> tuple[CustomIdCodec, re.Pattern[str]]:
    if request.param == "vertex":
        return vertex_codec(), VERTEX_RE
    factory = anthropic_codec if request.param == "anthropic" else bedrock_codec
    return factory(), ANTHROPIC_RE


def test_fitting_ids_are_kept_and_not_recorded() -> None:
    codec = anthropic_codec()
    for i, cid in enumerate(FITTING):
        assert codec.encode(cid, i) == cid
        assert codec.decode(cid) == cid
    assert codec.remapped == {}


@pytest.mark.parametrize("cid", HOSTILE, ids=[repr(h)[:30] for h in HOSTILE])
def test_hostile_ids_are_remapped(cid: str) -> None:
    codec = anthropic_codec()
    provider_id = codec.encode(cid, 11)
    assert provider_id == "bgl_11"
    assert ANTHROPIC_RE.fullmatch(provider_id)
    assert codec.decode(provider_id) == cid
    assert codec.remapped == {"bgl_11": cid}


def test_hostile_and_fitting_ids_never_collide(codec_and_re) -> None:
    codec, pattern = codec_and_re
    # Reserved-looking ids sit next to lines whose generated ids they spell.
    originals = ["bgl_1", "weird id", "bgl_0"] + [o for o in HOSTILE + FITTING
                                                  if o not in ("bgl_1", "bgl_0")]
    provider_ids = [codec.encode(cid, i) for i, cid in enumerate(originals)]
    assert len(set(provider_ids)) == len(originals)
    for pid, cid in zip(provider_ids, originals):
        assert pattern.fullmatch(pid), pid
        assert codec.decode(pid) == cid
    # Only the remapped ids cost state.
    assert set(codec.remapped) == {p for p, c in zip(provider_ids, originals) if p != c}


def test_reserved_prefix_is_always_remapped_even_when_it_fits() -> None:
    codec = anthropic_codec()
    assert codec.encode("weird id", 3) == "bgl_3"
    # A caller id literally "bgl_3" on another line must not alias the line-3 request.
    assert codec.encode("bgl_3", 9) == "bgl_9"
    assert codec.decode("bgl_3") == "weird id"
    assert codec.decode("bgl_9") == "bgl_3"
    # Case-insensitive: a case-folding provider could not confuse them either.
    assert codec.encode("BGL_3", 10) == "bgl_10"


def test_restore_after_restart_via_json() -> None:
    codec = anthropic_codec()
    ids = {i: codec.encode(cid, i) for i, cid in enumerate(HOSTILE + FITTING)}
    persisted = json.dumps(codec.remapped)
    restored = anthropic_codec(json.loads(persisted))
    for i, cid in enumerate(HOSTILE + FITTING):
        assert restored.decode(ids[i]) == cid
    # Re-submitting after a crash yields the same provider ids.
    assert [restored.encode(cid, i) for i, cid in enumerate(HOSTILE + FITTING)] == \
        [ids[i] for i in range(len(ids))]
    assert restored.remapped == json.loads(persisted)


def test_restore_does_not_alias_the_callers_dict() -> None:
    state: dict[str, str] = {}
    codec = anthropic_codec(state)
    codec.encode("a b", 0)
    assert state == {}


def test_decode_unknown_generated_id_raises() -> None:
    codec = anthropic_codec()
    with pytest.raises(KeyError):
        codec.decode("bgl_42")
    with pytest.raises(KeyError):
        codec.decode("BGL_42")
    assert codec.decode("plain") == "plain"


def test_conflicting_reencode_of_a_line_raises() -> None:
    codec = anthropic_codec()
    codec.encode("first id", 5)
    assert codec.encode("first id", 5) == "bgl_5"  # idempotent
    with pytest.raises(ValueError):
        codec.encode("second id", 5)


@pytest.mark.parametrize("line_no", [-1, 1.5, "3", True, None])
def test_bad_line_numbers(line_no) -> None:
    with pytest.raises(ValueError):
        anthropic_codec().encode("a b", line_no)


def test_generated_id_too_long_for_provider_raises() -> None:
    codec = CustomIdCodec(r"[a-z0-9_]+", max_length=6)
    assert codec.encode("ok", 99) == "ok"
    assert codec.encode("NOT OK", 99) == "bgl_99"
    with pytest.raises(ValueError):
        codec.encode("NOT OK", 100)


def test_pattern_must_accept_generated_ids() -> None:
    with pytest.raises(ValueError):
        CustomIdCodec(r"[0-9]+", max_length=64)
    with pytest.raises(ValueError):
        CustomIdCodec(r"[a-z0-9_]+", max_length=4)


def test_vertex_remaps_uppercase_and_64_chars() -> None:
    codec = vertex_codec()
    assert codec.encode("lower-case_1", 0) == "lower-case_1"
    assert codec.encode("Upper", 1) == "bgl_1"
    assert codec.encode("z" * 63, 2) == "z" * 63
    assert codec.encode("z" * 64, 3) == "bgl_3"
    assert codec.remapped == {"bgl_1": "Upper", "bgl_3": "z" * 64}


def test_bedrock_matches_anthropic_rules() -> None:
    assert bedrock_codec().encode("Upper-OK_1", 0) == "Upper-OK_1"
    assert bedrock_codec().encode("x" * 65, 0) == "bgl_0"


def test_compiled_pattern_is_accepted() -> None:
    codec = CustomIdCodec(re.compile(r"[A-Za-z0-9_]+"), 10)
    assert codec.encode("abc", 0) == "abc"
    assert codec.encode("a-b", 1) == "bgl_1"


def test_fuzz_round_trip_and_uniqueness(codec_and_re) -> None:
    codec, pattern = codec_and_re
    rng = random.Random(20240611)
    alphabet = ("abcXYZ019_-" + " /.:\n\t\x00é日😀" + "bgl_BGL")
    originals: set[str] = set()
    while len(originals) < 3000:
        n = rng.choice([0, 1, 2, 4, 8, 63, 64, 65, 100])
        candidate = "".join(rng.choice(alphabet) for _ in range(n))
        if rng.random() < 0.2:
            candidate = RESERVED_PREFIX + str(rng.randrange(3000))
        originals.add(candidate)
    ordered = sorted(originals)
    rng.shuffle(ordered)
    provider_ids = [codec.encode(cid, i) for i, cid in enumerate(ordered)]
    assert len(set(provider_ids)) == len(ordered)
    restored = type(codec)(codec._pattern, codec.max_length,
                           remapped=json.loads(json.dumps(codec.remapped)))
    for pid, cid in zip(provider_ids, ordered):
        assert pattern.fullmatch(pid)
        assert restored.decode(pid) == cid
