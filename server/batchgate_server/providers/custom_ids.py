"""Reversible custom_id mapping for providers that restrict request ids.

OpenAI custom_ids are arbitrary strings; Anthropic (``^[a-zA-Z0-9_-]{1,64}$``), Bedrock
recordIds and Vertex label values are not. A `CustomIdCodec` keeps every id that already
fits the provider's rules and replaces the others with ``bgl_<line_no>``.

Why this never collides: kept ids never start with the reserved prefix (compared without
regard to case, in case a provider folds case), so they can't equal a generated id, and
generated ids are unique because input line numbers are. Kept ids are unique among
themselves because OpenAI batch validation rejects duplicate custom_ids.

Only remapped ids are recorded (``remapped``: provider id -> original), so a batch of
well-behaved ids costs no state. The adapter persists ``codec.remapped`` (a plain
``dict[str, str]``, JSON-serialisable) in ``job.state`` and passes it back to the
constructor after a restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

RESERVED_PREFIX = "bgl_"
# The line number that gives the longest generated id a job can have (bgl_ and nine digits): what
# BatchProvider.request_size measures a remapped id with, so that a size is never under the real one.
LONGEST_LINE_NO = 999_999_999

# Anthropic Message Batches custom_id and Bedrock batch recordId.
ANTHROPIC_ID_PATTERN = r"[a-zA-Z0-9_-]+"
ANTHROPIC_ID_MAX_LENGTH = 64
BEDROCK_RECORD_ID_PATTERN = r"[a-zA-Z0-9_-]+"
BEDROCK_RECORD_ID_MAX_LENGTH = 64
# Vertex AI label values: lowercase letters, digits, '_' and '-', at most 63 characters.
VERTEX_LABEL_PATTERN = r"[a-z0-9_-]+"
VERTEX_LABEL_MAX_LENGTH = 63


class CustomIdCodec:
    """Maps caller custom_ids to provider-safe ids and back.

    `pattern` is matched against the whole id (``re.fullmatch``); `max_length` is checked
    separately so the pattern can stay a plain character class.
    """

    def __init__(self, pattern: str | re.Pattern[str] = ANTHROPIC_ID_PATTERN,
                 max_length: int = ANTHROPIC_ID_MAX_LENGTH, *,
                 remapped: Mapping[str, str] | None = None) -> None:
        if max_length < len(RESERVED_PREFIX) + 1:
            raise ValueError(f"max_length {max_length} is too small for generated ids")
        self._pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.max_length = max_length
        if not self.fits(RESERVED_PREFIX + "0"):
            raise ValueError(f"pattern {self._pattern.pattern!r} rejects generated ids")
        self.remapped: dict[str, str] = dict(remapped or {})

    def fits(self, custom_id: str) -> bool:
        """True when the provider accepts `custom_id` as is."""
        return (0 < len(custom_id) <= self.max_length
                and self._pattern.fullmatch(custom_id) is not None)

    @staticmethod
    def _reserved(custom_id: str) -> bool:
        return custom_id[: len(RESERVED_PREFIX)].lower() == RESERVED_PREFIX

    def encode(self, custom_id: str, line_no: int) -> str:
        """The provider id for the request on input line `line_no` (0- or 1-based, but the
        caller must use one convention per batch). Deterministic, so re-submitting after a
        crash yields the same ids."""
        if isinstance(line_no, bool) or not isinstance(line_no, int) or line_no < 0:
            raise ValueError(f"line_no must be a non-negative int, got {line_no!r}")
        if self.fits(custom_id) and not self._reserved(custom_id):
            return custom_id
        provider_id = f"{RESERVED_PREFIX}{line_no}"
        if not self.fits(provider_id):
            raise ValueError(f"generated id {provider_id!r} exceeds the provider's limits")
        previous = self.remapped.get(provider_id)
        if previous is not None and previous != custom_id:
            raise ValueError(
                f"line {line_no} was already mapped to a different custom_id ({previous!r})")
        self.remapped[provider_id] = custom_id
        return provider_id

    def decode(self, provider_id: str) -> str:
        """The caller's original custom_id. Raises KeyError for a generated id this codec
        never produced (lost state must not silently yield a wrong id)."""
        original = self.remapped.get(provider_id)
        if original is not None:
            return original
        if self._reserved(provider_id):
            raise KeyError(provider_id)
        return provider_id


def anthropic_codec(remapped: Mapping[str, str] | None = None) -> CustomIdCodec:
    return CustomIdCodec(ANTHROPIC_ID_PATTERN, ANTHROPIC_ID_MAX_LENGTH, remapped=remapped)


def bedrock_codec(remapped: Mapping[str, str] | None = None) -> CustomIdCodec:
    return CustomIdCodec(BEDROCK_RECORD_ID_PATTERN, BEDROCK_RECORD_ID_MAX_LENGTH, remapped=remapped)


def vertex_codec(remapped: Mapping[str, str] | None = None) -> CustomIdCodec:
    return CustomIdCodec(VERTEX_LABEL_PATTERN, VERTEX_LABEL_MAX_LENGTH, remapped=remapped)
