"""The tree's import rules (ARCHITECTURE.md), checked on the source: the core imports no method, methods never import
the command line, and no file imports another file's private (`_name`) helpers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "depthprune"
CORE = (
    "adapters",
    "plan",
    "runner",
    "decoding",
    "kv",
    "sharing",
    "io",
    "registry",
    "training",
    "ltt",
    "lora",
    "data",
    "fsutil",
    "errors",
)
METHODS = ("static", "exits", "generation", "bench", "demo")


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


FILES = sorted(SRC.rglob("*.py"))


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "depthprune" else ""


@pytest.mark.parametrize("path", [p for p in FILES if _top(_module(p)) in CORE], ids=lambda p: _module(p))
def test_the_core_imports_no_method(path):
    bad = [m for m, _ in _imports(path) if _top(m) in (*METHODS, "cli")]
    assert not bad, f"{_module(path)} (core) imports {bad}"


@pytest.mark.parametrize("path", [p for p in FILES if _top(_module(p)) in METHODS], ids=lambda p: _module(p))
def test_methods_never_import_the_command_line(path):
    bad = [m for m, _ in _imports(path) if _top(m) == "cli"]
    assert not bad, f"{_module(path)} imports {bad}"


def test_no_private_name_is_imported_across_files():
    bad = [
        f"{_module(p)}: from {m} import {n}"
        for p in FILES
        for m, names in _imports(p)
        if m.startswith("depthprune")
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "private helpers imported across files:\n" + "\n".join(bad)
