"""The validation worker: a process of its own that runs JsonlValidator for the server's uploads, so
that validating one chunk overlaps with receiving, hashing and writing the next on the event loop's
thread (and uses another core). core/upload_validation.py starts and feeds it.

    python -m batchgate_server.core.validation_process RING_FD

One worker serves many uploads at once, each by a number the server picks. It reads frames from
stdin and answers on stdout; stdin's end (the server closed it, or died) ends the worker. The
chunks themselves do not go through the pipe: the server copies each piece into a ring of shared
memory (the memfd RING_FD, inherited) and the FEED frame says where it lies. A pipe costs the
server's event loop a copy into the kernel and many wake-ups per MiB; the ring one memcpy.

    server -> worker: FRAME(op, upload, n) + n bytes
        OPEN    the pickled keyword arguments of JsonlValidator
        FEED    PIECE(offset, length): the next piece of the upload is ring[offset:offset + length]
        FINISH  (no payload) -> the worker answers RESULT or FAILED
        DROP    (no payload) the upload was aborted: forget it
    worker -> server: FRAME(status, upload, n) + n bytes
        TAKEN   (no payload) the piece of the oldest FEED not yet taken was copied out: the server
                may write over it. Every FEED gets one, in order, whatever becomes of its upload.
        RESULT  the pickled ValidationResult, whole
        FAILED  the traceback of a bug in the validator (utf-8)

Only the server writes the pipes and the ring, and the worker is its child: pickle carries nothing
untrusted. This module imports the validator and the standard library only: a worker starts in
tens of ms.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import sys
import traceback
from typing import BinaryIO

FRAME = struct.Struct("<BII")  # op or status, upload number, payload bytes
PIECE = struct.Struct("<II")  # a FEED's piece: its offset in the ring, its length
OPEN, FEED, FINISH, DROP = 1, 2, 3, 4
RESULT, FAILED, TAKEN = 1, 2, 3


def serve(requests: BinaryIO, answers: BinaryIO, ring: mmap.mmap) -> None:
    """Answer frames from `requests` until it ends; FEED pieces are read from `ring`."""
    from batchgate_server.core.jsonl_validation import JsonlValidator

    validators: dict[int, JsonlValidator] = {}
    failures: dict[int, str] = {}  # uploads whose validator raised (a bug): reported at FINISH
    while True:
        head = requests.read(FRAME.size)
        if len(head) < FRAME.size:
            return
        op, upload, length = FRAME.unpack(head)
        payload = requests.read(length) if length else b""
        if len(payload) < length:
            return
        if op == FEED:
            offset, size = PIECE.unpack(payload)
            piece = ring[offset:offset + size]  # a copy: the validator keeps the tail of its last line
            answer(answers, TAKEN, upload, b"")
        try:
            if op == FEED:
                if (validator := validators.get(upload)) is not None:
                    validator.feed(piece)
            elif op == OPEN:
                validators[upload] = JsonlValidator(**pickle.loads(payload))
            elif op == FINISH:
                validator = validators.pop(upload, None)
                failure = failures.pop(upload, None)
                if failure is None and validator is None:
                    failure = f"upload {upload} was never opened"
                if failure is None:
                    answer(answers, RESULT, upload, pickle.dumps(validator.finish(), pickle.HIGHEST_PROTOCOL))
                else:
                    answer(answers, FAILED, upload, failure.encode())
            elif op == DROP:
                validators.pop(upload, None)
                failures.pop(upload, None)
        except Exception:
            validators.pop(upload, None)
            failures[upload] = traceback.format_exc()
            if op == FINISH:
                answer(answers, FAILED, upload, failures.pop(upload).encode())


def answer(answers: BinaryIO, status: int, upload: int, payload: bytes) -> None:
    answers.write(FRAME.pack(status, upload, len(payload)) + payload)
    answers.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group: the server stops its workers itself (it closes their
    # stdin), so a worker must not die first under an upload still running.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Answers go to the stdout the server reads; anything printed by accident goes to stderr.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    ring_fd = int(sys.argv[1])
    ring = mmap.mmap(ring_fd, os.fstat(ring_fd).st_size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    os.close(ring_fd)
    with os.fdopen(0, "rb", buffering=1 << 16) as requests, answers, ring:
        serve(requests, answers, ring)


# Faults the ring's pages in at the map (Linux): a worker's memory is its fixed cost, not the first uploads'.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


if __name__ == "__main__":
    sys.exit(main())
