"""The server's layers import one way: api → core → providers / store / pricing → domain
(store, providers and pricing import themselves and domain only).

Every `import` of every server module (top level or inside a function, absolute or relative) is
read with `ast` and checked against the rules below, so an upward arrow fails here rather than in
review. app.py and cli.py wire everything together and are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchgate_server

PACKAGE = "batchgate_server"
ROOT = Path(batchgate_server.__file__).parent

# The only store modules core may import: the ports and the neutral errors. Implementations
# (SQLite, PostgreSQL, local disk, S3, GCS) are picked by app.py alone.
STORE_SEAM = {f"{PACKAGE}.store.ports", f"{PACKAGE}.store.errors"}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module of ours `path` imports (for `from x import y`, both x and x.y: y may be a
    submodule)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(module: str, imported: str) -> str | None:
    src, dst = _layer(module), _layer(imported)
    if src == dst:
        return None
    if src == "domain":
        return "domain imports nothing of ours"
    if src in ("store", "providers", "pricing") and dst != "domain":
        return f"{src} imports itself and domain only"
    if src == "core" and dst in ("api", "app", "cli"):
        return f"core must not import {dst}"
    if src == "core" and dst == "store" and imported != f"{PACKAGE}.store" and not any(
            imported == seam or imported.startswith(seam + ".") for seam in STORE_SEAM):
        return "core imports the store's ports and errors only, never an implementation"
    return None


def _all_modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "_pb2" not in p.name and "generated" not in p.parts)


def test_no_upward_imports():
    problems = []
    for path in _all_modules():
        module = _module_name(path)
        reported: list[str] = []
        for imported in sorted(_imports(path)):
            why = _violations(module, imported)
            if why and not any(imported.startswith(r + ".") for r in reported):
                reported.append(imported)
                problems.append(f"{module} imports {imported}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("module", "imported", "bad"), [
    ("batchgate_server.store.sqlite.metadata", "batchgate_server.core.models", True),
    ("batchgate_server.providers.base", "batchgate_server.core.backoff", True),
    ("batchgate_server.pricing.cost", "batchgate_server.api.errors", True),
    ("batchgate_server.domain.models", "batchgate_server.config", True),
    ("batchgate_server.domain.models", "batchgate_server.store.errors", True),
    ("batchgate_server.core.files", "batchgate_server.store.sqlite.metadata", True),
    ("batchgate_server.core.files", "batchgate_server.store.blobs.local", True),
    ("batchgate_server.core.files", "batchgate_server.store.urls", True),
    ("batchgate_server.providers.staged", "batchgate_server.store.ports", True),
    ("batchgate_server.providers.base", "batchgate_server.pricing.cost", True),
    ("batchgate_server.store.sqlite.ledger", "batchgate_server.config", True),
    ("batchgate_server.core.files", "batchgate_server.store.ports", False),
    ("batchgate_server.core.files", "batchgate_server.store.errors", False),
    ("batchgate_server.store.sqlite.metadata", "batchgate_server.domain.models", False),
    ("batchgate_server.domain.deployment", "batchgate_server.domain.models", False),
    ("batchgate_server.app", "batchgate_server.store.sqlite.metadata", False),
])
def test_rules_catch_upward_arrows(module, imported, bad):
    assert (_violations(module, imported) is not None) is bad


def test_relative_and_local_imports_are_seen(tmp_path):
    pkg = tmp_path / PACKAGE / "store"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from ..core import files\nfrom . import ports\n\n\n"
                              "def f():\n    import batchgate_server.api\n")
    found = _imports(pkg / "x.py", root=tmp_path / PACKAGE)
    assert {"batchgate_server.core.files", "batchgate_server.store.ports", "batchgate_server.api"} <= found
