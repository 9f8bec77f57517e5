"""glibc malloc settings for a process that streams megabyte buffers (the server, its validation workers).

Every chunk of an upload or a download is a buffer of about 1 MiB (gRPC's message, its bytes object,
the protobuf field). glibc serves an allocation that large with a fresh mmap and unmaps it when it is
freed, so each chunk's pages are faulted in and zeroed again: bench/upload.py counted ~480 minor page
faults per MiB received, 1.2-1.9 ms of system CPU per MiB, about 40% of the server's whole cost of an
upload. With such buffers served from the heap and the heap's top kept, they are reused: under 30
faults per MiB and 0.5-1 ms less CPU per MiB. The price is memory a peak leaves behind: at most
TRIM_THRESHOLD bytes free at the top of a heap stay mapped, and buffers under MMAP_THRESHOLD are
carved from the heap (the largest chunk a client may send is 4 MiB by default).

That price is paid per arena, and glibc gives threads arenas of their own (up to 8 per core): gRPC's
threads each kept the peak of the buffers they handled. At most ARENA_MAX arenas (the loop's thread
and one for the others): bench/upload.py's first 200 MiB upload grew the loop process by 11 MiB
instead of 17-23, the 1M-short-line upload the whole server by 16 MiB instead of 18-35, at the same
rate (0.71-0.79 of the ceiling, against 0.73).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20


def keep_large_buffers() -> bool:
    """Apply the settings above when the C library is glibc (elsewhere: nothing). True if applied."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        applied = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                   and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                   and libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1)
    except (OSError, AttributeError):
        return False
    if not applied:
        log.debug("mallopt refused the buffer settings; malloc keeps its defaults")
    return applied
