"""A real small filesystem to fill up: a tmpfs mounted for one test (we run as root, CI too).

    with SmallDisk(tmp_path / "disk") as disk:     # or the `small_disk` fixture (tests/conftest.py)
        ... start a server with data_dir=disk.root / "data" ...
        disk.fill()    # one filler file takes every free byte (or all but `leave` bytes)
        disk.free()    # and gives them back
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

FILLER = "filler"


class SmallDisk:
    def __init__(self, root: Path, size: str = "16m") -> None:
        self.root = root
        self.size = size

    def __enter__(self) -> "SmallDisk":
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.root)], check=True)
        return self

    def __exit__(self, *exc) -> None:
        # Lazy: a file the server still holds open must not keep the mount (and the test) alive.
        subprocess.run(["umount", "--lazy", str(self.root)], check=True)

    @property
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Write a filler file until not one more byte fits, then give back `leave` bytes."""
        chunk = 1024 * 1024
        with open(self.root / FILLER, "ab", buffering=0) as fh:
            while chunk:
                try:
                    fh.write(b"\0" * chunk)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        assert self.free_bytes == 0
        if leave:
            os.truncate(self.root / FILLER, os.path.getsize(self.root / FILLER) - leave)

    def free(self) -> None:
        (self.root / FILLER).unlink()
