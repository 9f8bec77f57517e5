"""The server's glibc malloc settings (server/batchgate_server/malloc_tuning.py) take effect: megabyte buffers
made and freed over and over, on two threads as the server's are, are served again from memory already mapped
instead of being faulted in afresh each time."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"

CHURN = """
import resource, sys, threading
sys.path.insert(0, {server!r})
if {tuned!r}:
    from batchgate_server.malloc_tuning import keep_large_buffers
    assert keep_large_buffers()
def churn():
    for _ in range(200):
        chunk = bytes(1 << 20)
        joined = chunk + b"x"
        del chunk, joined
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=churn)
worker.start()
worker.join()
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(script: str, tuned: bool) -> int:
    """The number `script` prints, run in a new process, with the server's settings or without."""
    out = subprocess.run([sys.executable, "-c", script.format(server=str(SERVER), tuned=tuned)],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def page_faults(tuned: bool) -> int:
    return run(CHURN, tuned)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_megabyte_buffers_are_reused_instead_of_faulted_in_again():
    # 800 buffers of 1 MiB, 256 pages each: up to ~200,000 faults if each is mapped afresh. Measured on the
    # development machine: ~97,000 with glibc's defaults, ~1,500 with the settings.
    default, tuned = page_faults(tuned=False), page_faults(tuned=True)
    assert tuned < 20_000, (default, tuned)
    assert default > 5 * tuned, (default, tuned)  # the settings are what makes the difference


ARENAS = """
import ctypes, os, sys, tempfile, threading
sys.path.insert(0, {server!r})
if {tuned!r}:
    from batchgate_server.malloc_tuning import keep_large_buffers
    assert keep_large_buffers()
start = threading.Barrier(8)
def allocate():
    start.wait()  # all at once, as gRPC's threads receive
    held = [bytes(256 << 10) for _ in range(16)]
    del held
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def arenas(tuned: bool) -> int:
    return run(ARENAS, tuned)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_threads_share_at_most_two_arenas():
    """Each arena keeps its own peak (the trim threshold above): eight threads allocating at once
    get arenas of their own by default, and share two with the settings."""
    from batchgate_server.malloc_tuning import ARENA_MAX

    default, tuned = arenas(tuned=False), arenas(tuned=True)
    assert tuned <= ARENA_MAX < default, (default, tuned)
