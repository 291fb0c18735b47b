"""Adapter registry: one adapter per architecture family, found by `config.model_type`, or by model class for models
whose config has no model_type (diffusers' `DiTTransformer2DModel`).

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
    "dit",
)
_REGISTRY: dict[str, Adapter] = {}
_BY_CLASS: dict[str, Adapter] = {}
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
            for name in adapter.model_classes:
                _BY_CLASS.setdefault(name, adapter)


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Register `adapter` for each of its `model_types` and `model_classes`.

    Raises ValueError if a model_type already has an adapter, unless `replace=True`.
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter expects a depthprune Adapter, got {type(adapter).__name__}")
    _load_builtins()
    taken = [t for t in adapter.model_types if t in _REGISTRY and _REGISTRY[t] is not adapter]
    taken_classes = [c for c in adapter.model_classes if c in _BY_CLASS and _BY_CLASS[c] is not adapter]
    if (taken or taken_classes) and not replace:
        owner = _REGISTRY[taken[0]] if taken else _BY_CLASS[taken_classes[0]]
        raise ValueError(
            f"model_type(s) / class(es) {taken + taken_classes} already have an adapter ({owner.family}); "
            "pass replace=True to override it"
        )
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    for name in adapter.model_classes:
        _BY_CLASS[name] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """Every supported `config.model_type`, then the model classes found by class (diffusers models)."""
    _load_builtins()
    return sorted(_REGISTRY) + sorted(_BY_CLASS)


def get_adapter(model_or_config: nn.Module | object) -> Adapter:
    """The adapter for a model (or its config), by `config.model_type`, else by the model's class (its hierarchy)."""
    _load_builtins()
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = (_REGISTRY.get(model_type) or _BY_CLASS.get(model_type)) if model_type else None  # listed by class too
    if adapter is None:
        for cls in type(model_or_config).__mro__:
            if cls.__name__ in _BY_CLASS:
                adapter = _BY_CLASS[cls.__name__]
                break
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
