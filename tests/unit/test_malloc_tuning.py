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


def page_faults(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN.format(server=str(SERVER), tuned=tuned)],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_megabyte_buffers_are_reused_instead_of_faulted_in_again():
    # 800 buffers of 1 MiB, 256 pages each: up to ~200,000 faults if each is mapped afresh. Measured on the
    # development machine: ~97,000 with glibc's defaults, ~1,500 with the settings.
    default, tuned = page_faults(tuned=False), page_faults(tuned=True)
    assert tuned < 20_000, (default, tuned)
    assert default > 5 * tuned, (default, tuned)  # the settings are what makes the difference
