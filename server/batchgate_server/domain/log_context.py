"""What the code running now is working on, for log lines: a batch, a file, a project, a
deployment. Context variables follow each asyncio task (a batch's runner sets its batch once and
every line it logs, down to the provider, carries it) and cost nothing when nobody reads them."""

from __future__ import annotations

import contextvars

FIELDS = ("batch_id", "file_id", "project", "deployment")
_vars = {name: contextvars.ContextVar(f"batchgate_{name}", default="") for name in FIELDS}


def bind(**fields: str) -> None:
    """Set fields for the current task (and the tasks it starts from now on)."""
    for name, value in fields.items():
        _vars[name].set(value or "")


def current() -> dict[str, str]:
    """The fields that are set."""
    return {name: value for name, var in _vars.items() if (value := var.get())}
