"""Copies of a model's own modules that share its weights, and re-tying the layers a plan repeated after a reload.

Core: used by plans (repeated layers), adapters (ALBERT's shared groups) and loading (exports store each position's
weights; `tie_repeated_layers` shares them again from the record in the config).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn
from transformers import PreTrainedConfig

from depthprune.adapters.base import backbone, get_path
from depthprune.adapters.registry import get_adapter
from depthprune.errors import UnsupportedArchitectureError
from depthprune.plan import PLAN_CONFIG_KEY


def share_clone(module: nn.Module, *, share_config: bool = False) -> nn.Module:
    """A structural copy of `module` that shares every parameter and buffer with it (no weight memory).

    share_config=True also shares the config objects its submodules hold (a repeated layer belongs to the same model
    as its original, so it must see that model's config, not a private stale copy of it).
    """
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    if share_config:
        configs = (getattr(m, "config", None) for m in module.modules())
        memo.update({id(c): c for c in configs if isinstance(c, PreTrainedConfig)})
    return copy.deepcopy(module, memo)


def tie_repeated_layers(model: nn.Module) -> nn.Module:
    """Make positions that shared parameters when the plan was applied share them again (after loading an export,
    which stores each position's weights separately). The groups of positions come from the record in the config
    ("shared_layers"); the model is changed in place and returned (call it on a freshly loaded model only)."""
    record = getattr(model.config, PLAN_CONFIG_KEY, None) or {}
    shared = record.get("shared_layers") or {}
    if not shared:
        return model
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        warnings.warn(
            f"{model.config.model_type!r} has no depthprune adapter in this process, so its repeated layers stay "
            "untied copies (same values, separate memory); register its adapter before loading to share them",
            stacklevel=2,
        )
        return model
    root = backbone(model)
    for stack in adapter.present_stacks(model):
        layers = get_path(root, stack.layers)
        for group in shared.get(stack.name, ()):
            owner = layers[group[0]]
            for pos in group[1:]:
                for mod_name, module in layers[pos].named_modules():
                    twin = owner.get_submodule(mod_name)
                    for p_name in list(module._parameters):
                        module._parameters[p_name] = twin._parameters[p_name]
    return model
