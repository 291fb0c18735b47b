"""depthprune: make Transformer models shallower, with the quality loss measured.

Public API (imported lazily so `import depthprune` is fast):
    LayerPlan, apply_plan, save_model, load_model, get_adapter, register_adapter, Adapter, StackSpec, ConfigField,
    merge_layers, laco, share_layers (layer fusion)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LayerPlan": "depthprune.plan",
    "apply_plan": "depthprune.static.apply",
    "share_clone": "depthprune.static.apply",
    "save_model": "depthprune.static.export",
    "load_model": "depthprune.io",
    "load_tokenizer": "depthprune.io",
    "get_adapter": "depthprune.adapters.registry",
    "register_adapter": "depthprune.adapters.registry",
    "supported_model_types": "depthprune.adapters.registry",
    "Adapter": "depthprune.adapters.base",
    "StackSpec": "depthprune.adapters.base",
    "ConfigField": "depthprune.adapters.base",
    "merge_layers": "depthprune.static.fusion",
    "laco": "depthprune.static.fusion",
    "share_layers": "depthprune.static.fusion",
    "get_scorer": "depthprune.static.scorers",
    "list_scorers": "depthprune.static.scorers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'depthprune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
