"""Architecture adapters: where the layers, norm and head of each model family are."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec, backbone, get_path
from depthprune.adapters.registry import get_adapter, register_adapter, supported_model_types

__all__ = [
    "Adapter",
    "ConfigField",
    "StackSpec",
    "backbone",
    "get_adapter",
    "get_path",
    "register_adapter",
    "supported_model_types",
]
