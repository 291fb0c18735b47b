"""Adapter registry: one adapter per architecture family, found by `config.model_type`.

Third parties register their own with `register_adapter(Adapter(...))`. Built-in families are imported lazily the
first time an adapter is looked up, so `import depthprune` stays fast.
"""

from __future__ import annotations

import importlib

from torch import nn

from depthprune.adapters.base import Adapter
from depthprune.errors import UnsupportedArchitectureError

_BUILTIN_MODULES = (
    "llama",
    "gemma",
    "gpt2",
    "gpt_neox",
    "opt",
    "bert",
    "distilbert",
    "albert",
    "t5",
    "bart",
)
_REGISTRY: dict[str, Adapter] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        module = importlib.import_module(f"depthprune.adapters.{mod}")
        for adapter in module.ADAPTERS:
            for model_type in adapter.model_types:
                _REGISTRY.setdefault(model_type, adapter)


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Register `adapter` for each of its `model_types`.

    Raises ValueError if a model_type already has an adapter, unless `replace=True`.
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter expects a depthprune Adapter, got {type(adapter).__name__}")
    _load_builtins()
    taken = [t for t in adapter.model_types if t in _REGISTRY and _REGISTRY[t] is not adapter]
    if taken and not replace:
        raise ValueError(
            f"model_type(s) {taken} already have an adapter ({_REGISTRY[taken[0]].family}); "
            "pass replace=True to override it"
        )
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_adapter(model_or_config: nn.Module | object) -> Adapter:
    """The adapter for a model (or its config), by `config.model_type`."""
    _load_builtins()
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type) if model_type else None
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"depthprune has no adapter for model_type {model_type!r} ({type(model_or_config).__name__}). "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "To add one, describe where the layers are: "
            "depthprune.register_adapter(depthprune.Adapter(family=..., model_types=(...,), "
            "stacks=(depthprune.StackSpec(name='decoder', layers='layers', index_attrs=('self_attn.layer_idx',), "
            "depth_fields=(depthprune.ConfigField('num_hidden_layers'),)),), heads=('lm_head',)))"
        )
    return adapter
