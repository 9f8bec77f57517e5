"""providers/lines.py: a provider's download, in blocks cut anywhere, into JSONL lines (no newline,
no trailing CR, blank lines dropped), whatever the block boundaries."""

from __future__ import annotations

import pytest

from batchgate_server.providers.lines import complete_lines, last_line

STREAM = (b'{"a": 1}\r\n\n   \n{"b": "x\\ny"}\n\r\n\t\n{"c": 3}\r\r\n  {"d": 4}  \n'
          + b'{"e": "' + b"z" * 5000 + b'"}\n{"tail": true}')
EXPECTED = [b'{"a": 1}', b'{"b": "x\\ny"}', b'{"c": 3}', b'  {"d": 4}  ', b'{"e": "' + b"z" * 5000 + b'"}',
            b'{"tail": true}']


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 4096, 1 << 20])
def test_lines_whatever_the_blocks(block):
    pending, lines = bytearray(), []
    for at in range(0, len(STREAM), block):
        pending += STREAM[at:at + block]
        got = complete_lines(pending)
        assert all(type(line) is bytes for line in got)
        lines += got
        assert b"\n" not in pending  # what stays is the unfinished line only
    if (line := last_line(pending)) is not None:
        lines.append(line)
    assert lines == EXPECTED


def test_no_newline_yet_keeps_everything():
    pending = bytearray(b'{"partial": ')
    assert complete_lines(pending) == [] and pending == b'{"partial": '
    assert last_line(bytearray(b" \r\n ")) is None
