"""glibc malloc settings for a process that streams megabyte buffers (the server, its validation workers).

Every chunk of an upload or a download is a buffer of about 1 MiB (gRPC's message, its bytes object,
the protobuf field). glibc serves an allocation that large with a fresh mmap and unmaps it when it is
freed, so each chunk's pages are faulted in and zeroed again: bench/upload.py counted ~480 minor page
faults per MiB received, 1.2-1.9 ms of system CPU per MiB, about 40% of the server's whole cost of an
upload. With such buffers served from the heap and the heap's top kept, they are reused: under 30
faults per MiB and 0.5-1 ms less CPU per MiB. The price is memory a peak leaves behind: at most
TRIM_THRESHOLD bytes free at the top of a heap stay mapped, and buffers under MMAP_THRESHOLD are
carved from the heap (the largest chunk a client may send is 4 MiB by default).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20


def keep_large_buffers() -> bool:
    """Apply the settings above when the C library is glibc (elsewhere: nothing). True if applied."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if not applied:
        log.debug("mallopt refused the buffer settings; malloc keeps its defaults")
    return applied
