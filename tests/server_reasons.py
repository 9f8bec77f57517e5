"""Every ErrorInfo reason the server's code can raise, found by reading it (an `ast` walk).

A reason reaches a caller through a call that takes one: an ApiError subclass (`InvalidArgument(message,
reason, …)`), a helper with a `reason` parameter (`_invalid(message, reason, …)`, `UnsupportedRequest(…,
reason=…)` and its default), or a helper whose reason is an f-string of a parameter (`not_found(kind, id)`:
`f"{kind.upper()}_NOT_FOUND"`), resolved at each of its calls. The reason passed is a string literal (or a
choice between literals), or it is forwarded: a parameter of the function making the call, or another
error's `.reason`, both checked where they began. Anything else is reported as
unresolved, so a reason computed some new way fails the test instead of slipping past it.

Run it to list them: `python tests/server_reasons.py`.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server" / "batchgate_server"
ERROR_BASE = "ApiError"  # core/errors.py: its dataclass fields are (message, reason, …)


@dataclass
class Takes:
    """How a callable takes its reason: positional index (not counting self) and default."""

    index: int | None
    default: str | None = None


@dataclass
class Scan:
    reasons: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> where
    unresolved: list[str] = field(default_factory=list)  # where a reason is computed some other way


def documented() -> dict:
    """reason -> gen_error_table.Reason (code, when, what to do), as proto/batchgate/v1/error_reason.proto
    documents them."""
    spec = importlib.util.spec_from_file_location("gen_error_table", ROOT / "scripts" / "gen_error_table.py")
    module = sys.modules.get("gen_error_table")
    if module is None:
        module = sys.modules["gen_error_table"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return {reason.name: reason for reason in module.reasons()}


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    return [a.arg for a in fn.args.posonlyargs + fn.args.args]


def _takes(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> Takes | None:
    args = fn.args
    positional = _params(fn)[1:] if method else _params(fn)
    if "reason" in positional:
        index = positional.index("reason")
        defaults = dict(zip(reversed(_params(fn)), reversed(args.defaults)))
        default = defaults.get("reason")
        return Takes(index, default.value if isinstance(default, ast.Constant) else None)
    kwonly = [a.arg for a in args.kwonlyargs]
    if "reason" in kwonly:
        default = args.kw_defaults[kwonly.index("reason")]
        return Takes(None, default.value if isinstance(default, ast.Constant) else None)
    return None


def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(SERVER.rglob("*.py"))}


def _reason_takers(modules: dict[Path, ast.Module]) -> dict[str, Takes]:
    """Callable name -> how it takes a reason, over the whole server (names are unique enough here:
    same-named helpers in different modules take the reason at the same place, checked below)."""
    takers: dict[str, Takes] = {}
    error_classes = {ERROR_BASE}
    classes = [node for tree in modules.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    grew = True
    while grew:  # subclasses of subclasses, in any order
        grew = False
        for cls in classes:
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in cls.bases}
            if cls.name not in error_classes and bases & error_classes:
                error_classes.add(cls.name)
                grew = True
    for name in error_classes:
        takers[name] = Takes(1)
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        found = _takes(item, method=True)
                        if found and node.name not in error_classes:
                            takers[node.name] = found
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__init__":
                found = _takes(node, method=False)
                if found:
                    assert takers.get(node.name, found) == found, f"{node.name} takes its reason in two ways"
                    takers[node.name] = found
    return takers


def _literals(expr: ast.expr) -> list[str] | None:
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, ast.IfExp):
        body, orelse = _literals(expr.body), _literals(expr.orelse)
        return body + orelse if body is not None and orelse is not None else None
    return None


@dataclass
class Template:
    """A helper whose reason is an f-string of one of its parameters (`f"{kind.upper()}_NOT_FOUND"` in
    not_found(kind, id), `f"INVALID_{name.upper()}"`): its reasons are found at its calls."""

    index: int  # the parameter's position
    param: str
    pieces: list[str | None]  # literal text, or None where the parameter's value goes
    upper: bool

    def render(self, value: str) -> str:
        text = value.upper() if self.upper else value
        return "".join(text if piece is None else piece for piece in self.pieces)


def _template(joined: ast.JoinedStr, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Template | None:
    params, pieces, found, upper = _params(fn), [], None, False
    for value in joined.values:
        if isinstance(value, ast.Constant):
            pieces.append(value.value)
            continue
        expr = value.value if isinstance(value, ast.FormattedValue) else None
        upper = isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "upper"
        if upper:
            expr = expr.func.value
        if not (isinstance(expr, ast.Name) and expr.id in params) or found not in (None, expr.id):
            return None
        found = expr.id
        pieces.append(None)
    return Template(params.index(found), found, pieces, upper) if found else None


def _call_name(node: ast.Call) -> str | None:
    return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)


def _given_reason(node: ast.Call, takes: Takes) -> ast.expr | None:
    given = next((kw.value for kw in node.keywords if kw.arg == "reason"), None)
    if given is None and takes.index is not None and len(node.args) > takes.index:
        given = node.args[takes.index]
    return given


def _templates(modules: dict[Path, ast.Module], takers: dict[str, Takes]) -> dict[str, Template]:
    templates = {}
    for tree in modules.values():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and _call_name(node) in takers:
                    given = _given_reason(node, takers[_call_name(node)])
                    if isinstance(given, ast.JoinedStr) and (template := _template(given, fn)):
                        templates[fn.name] = template
    return templates


def scan() -> Scan:
    modules = _modules()
    takers = _reason_takers(modules)
    templates = _templates(modules, takers)
    result = Scan()

    def add(found: list[str] | None, given: ast.expr, params: set[str], where: str) -> None:
        if found is not None:
            for reason in found:
                result.reasons[reason].append(where)
        elif isinstance(given, ast.Name) and given.id in params:
            pass  # forwarded: the caller's literal is checked at its own call
        elif isinstance(given, ast.Attribute) and given.attr == "reason":
            pass  # re-raised from another error, whose reason is checked where it was raised
        else:
            result.unresolved.append(where)

    def visit(node: ast.AST, fn: str, params: set[str], where_file: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            fn, params = node.name, set(_params(node)) | {a.arg for a in node.args.kwonlyargs}
        if isinstance(node, ast.Call):
            name, where = _call_name(node), f"{where_file}:{node.lineno}"
            if name in templates:
                template = templates[name]
                given = next((kw.value for kw in node.keywords if kw.arg == template.param), None)
                if given is None and len(node.args) > template.index:
                    given = node.args[template.index]
                if given is not None:
                    literals = _literals(given)
                    add(literals and [template.render(v) for v in literals], given, params, where)
            if name in takers:
                given = _given_reason(node, takers[name])
                if given is None:
                    if takers[name].default is not None:
                        result.reasons[takers[name].default].append(where)
                elif not (isinstance(given, ast.JoinedStr) and fn in templates):  # a template's own call
                    add(_literals(given), given, params, where)
        for child in ast.iter_child_nodes(node):
            visit(child, fn, params, where_file)

    for path, tree in modules.items():
        visit(tree, "", set(), str(path.relative_to(ROOT)))
    return result


if __name__ == "__main__":
    found = scan()
    for reason in sorted(found.reasons):
        print(reason, *found.reasons[reason][:3])
    for where in found.unresolved:
        print("unresolved:", where, file=sys.stderr)
    sys.exit(1 if found.unresolved else 0)
