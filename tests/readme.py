"""README.md read as a user reads it: the tests that run its examples take them from here, as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(heading: str) -> str:
    """The text under `heading` (e.g. "## grpcurl") up to the next heading of the same level."""
    text = README.read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + 1
    end = text.find(f"\n{level} ", start + len(heading))
    return text[start:end if end != -1 else len(text)]


def sh_blocks(heading: str) -> list[str]:
    """The ```sh blocks of a section, as written."""
    return [block.split("```", 1)[0] for block in section(heading).split("```sh\n")[1:]]


def flag_table(heading: str = "## Running the server") -> dict[str, str]:
    """The flags of the section's table, each with its environment variable."""
    return dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| `?([A-Z0-9_]*)`? \|", section(heading), re.M))
