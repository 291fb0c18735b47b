"""Registries of methods by name (criteria, scorers, recipes): lazy imports, one error message, one parser."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def load_builtin(table: Mapping[str, str], name: str, kind: str, attr: str | None = None) -> Any:
    """Import the module registered as `name` in `table` (name -> module path) and return it, or its `attr`.

    Imports happen on first use so that start-up stays fast; an unknown name lists the known ones."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(table)}")
    module = importlib.import_module(table[name])
    return module if attr is None else getattr(module, attr)


def parse_threshold(text: str, criterion_class: Callable[[str], Any]) -> Any:
    """'max_prob:0.9' -> criterion_class('max_prob')(0.9), with errors that show the expected form."""
    name, sep, value = text.partition(":")
    cls = criterion_class(name.strip())
    if not sep:
        grid = cls.grid()
        raise ValueError(f"give a threshold: '{name}:VALUE', e.g. '{name}:{grid[len(grid) // 2]}'")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"threshold {value!r} of criterion {name!r} is not a number") from None
    return cls(threshold)
