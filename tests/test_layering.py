"""The layers, checked on the source: no module imports upward, and SQL lives only in storage/.

The rule, from the edge down:
  serve_app  (the HTTP edge)       may import actors, storage, config
  actors     (shards, jobs, core)  may import storage, config
  storage    (Postgres)            may import config
  config                           imports none of them
  metergate_client (the gateway's library: the pure gate decision, the view format, the
                    client)        imports none of them; serve_app and actors may import it
  cli        (the operator's command line, an HTTP client) may import config and storage (for
             `migrate`), and actors (for `check`, which rebuilds orgs as a shard does); nothing
             imports it
A package may always import its own modules. Every import counts, at module level or inside a
function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serve_app", "actors", "storage", "config", "metergate_client", "cli")
MAY_IMPORT = {
    "serve_app": {"serve_app", "actors", "storage", "config", "metergate_client"},
    "actors": {"actors", "storage", "config", "metergate_client"},
    "storage": {"storage", "config"},
    "config": {"config"},
    "metergate_client": {"metergate_client"},
    "cli": {"cli", "config", "storage", "actors"},
}

# Upper-case SQL, as the code writes it; English prose ("select a plan") does not match.
SQL = re.compile(
    r"\bSELECT\b.*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\b.*\bSET\b|\bDELETE\s+FROM\b"
    r"|\bON\s+CONFLICT\b|\b(?:CREATE|ALTER|DROP)\s+(?:TABLE|INDEX)\b",
    re.DOTALL)


def modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of the packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def imported_modules(name: str, path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the module, relative ones resolved."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # from . import x: x is a module of that package
                out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, target))
    return out


def test_no_module_imports_a_layer_above_it():
    upward = []
    for name, path in modules():
        own = name.split(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imported_modules(name, path, tree):
            top = target.split(".")[0]
            if top in PACKAGES and top not in MAY_IMPORT[own]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {target}")
    rule = "; ".join(f"{p} may import {', '.join(sorted(MAY_IMPORT[p] - {p})) or 'none of them'}" for p in PACKAGES)
    assert not upward, f"{len(upward)} upward import(s) ({rule}):\n  " + "\n  ".join(upward)


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the constant nodes that are docstrings."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string literal but docstrings; an f-string as one text, {} for its holes."""
    skip = docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
            skip.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            out.append((node.lineno, node.value))
    return sorted(out)


def test_sql_is_written_only_under_storage():
    found = []
    for name, path in modules():
        if name.split(".")[0] == "storage":
            continue
        for line, text in string_literals(ast.parse(path.read_text(), str(path))):
            if SQL.search(text):
                shown = " ".join(text.split())
                found.append(f"{path.relative_to(ROOT)}:{line}: {shown[:100]}{'…' if len(shown) > 100 else ''}")
    assert not found, f"{len(found)} SQL string(s) outside storage/:\n  " + "\n  ".join(found)


def test_the_checks_see_what_they_should():
    """The walkers themselves: an upward import and SQL are found, prose and docstrings are not."""
    tree = ast.parse('"""SELECT x FROM docstring"""\nfrom ..serve_app import app\nfrom . import ledger\n'
                     'import serve_app.app\ndef f():\n    from serve_app import app\n'
                     '    return "select a plan from the list", f"SELECT a FROM {t}", "x ON CONFLICT (k) DO NOTHING"\n')
    targets = [t for _, t in imported_modules("storage.journal", ROOT / "storage" / "journal.py", tree)]
    assert sorted(targets) == ["serve_app", "serve_app", "serve_app.app", "storage.ledger"], targets
    sql = [t for _, t in string_literals(tree) if SQL.search(t)]
    assert sql == ["SELECT a FROM {}", "x ON CONFLICT (k) DO NOTHING"], sql
