"""Apply a LayerPlan to a model: a new model of the same class whose stacks run the planned layers.

The result is an ordinary Hugging Face model: its own forward pass runs the rearranged `nn.ModuleList`, config depth
fields and per-layer fields follow the plan, and layer indices are renumbered so each position has its own KV cache
slot. Repeated layers are separate modules that share their parameters.
"""

from __future__ import annotations

import copy

from torch import nn

from depthprune.adapters.base import Adapter, StackSpec, backbone, get_path, has_path, set_config_value, set_path
from depthprune.adapters.registry import get_adapter
from depthprune.errors import PlanError
from depthprune.io import tie_repeated_layers
from depthprune.plan import PLAN_CONFIG_KEY, LayerPlan, compose
from depthprune.sharing import share_clone


def clone_model(model: nn.Module, share_weights: bool = False) -> nn.Module:
    """A copy of `model`; with `share_weights` only the module structure and config are copied."""
    return share_clone(model) if share_weights else copy.deepcopy(model)


def source_plan(model: nn.Module) -> LayerPlan | None:
    """The plan (on the original model's layers) recorded in a model made by depthprune, if any."""
    record = getattr(model.config, PLAN_CONFIG_KEY, None)
    if not record:
        return None
    return LayerPlan.from_dict(record["plan"])


def layer_sizes(model: nn.Module, adapter: Adapter | None = None) -> dict[str, int]:
    """Number of source layers per stack, which plan indices refer to."""
    return (adapter or get_adapter(model)).num_layers(model)


def apply_plan(model: nn.Module, plan: LayerPlan | str, *, share_weights: bool = False) -> nn.Module:
    """Return a new model running `plan`; `model` is left untouched.

    share_weights=True makes the new model share parameter tensors with `model` (for cheap what-if evaluation while
    scoring); the default copies them so that training or editing the result cannot change the input.
    """
    adapter = get_adapter(model)
    if isinstance(plan, str):
        plan = LayerPlan.parse(plan)
    if not isinstance(plan, LayerPlan):
        raise PlanError(f"plan must be a LayerPlan or its text form, got {type(plan).__name__}")
    sizes = adapter.num_layers(model)
    plan = plan.resolve(sizes)

    new = clone_model(model, share_weights)
    root = backbone(new)
    for stack in adapter.present_stacks(new):
        indices = list(plan.stacks[stack.name])
        source_layers = list(get_path(root, stack.layers))
        if adapter.apply_stack is not None:
            adapter.apply_stack(new, stack, indices)
        else:
            _rearrange(root, stack, source_layers, indices)
        _update_config(root, stack, indices)
        for path in stack.module_depth_attrs:
            if has_path(root, path):
                set_path(root, path, len(indices))
        if adapter.post_apply is not None:
            adapter.post_apply(new, stack, source_layers, indices)

    previous = source_plan(model)
    record = getattr(model.config, PLAN_CONFIG_KEY, None) or {}
    original_sizes = record.get("source_num_layers", sizes)
    set_config_value(
        new,
        PLAN_CONFIG_KEY,
        {
            "plan": (compose(plan, previous) if previous else plan).to_dict(),
            "source_num_layers": dict(original_sizes),
            "source": record.get("source", getattr(model.config, "_name_or_path", "") or ""),
            "shared_layers": _shared_layers(new, adapter),
        },
    )
    return new


def _shared_layers(model: nn.Module, adapter: Adapter) -> dict[str, list[list[int]]]:
    """Per stack, the groups of module-list positions that share their parameters (repeated layers, or ALBERT groups
    that run the same source group), so that `tie_repeated_layers` can restore the sharing after an export."""
    out = {}
    for stack in adapter.present_stacks(model):
        owner: dict[int, int] = {}  # id(parameter) -> first position holding it
        groups: dict[int, list[int]] = {}
        for pos, layer in enumerate(get_path(backbone(model), stack.layers)):
            params = list(layer.parameters())
            first = next((owner[id(p)] for p in params if id(p) in owner), pos)
            for p in params:
                owner.setdefault(id(p), first)
            groups.setdefault(first, []).append(pos)
        shared = [g for g in groups.values() if len(g) > 1]
        if shared:
            out[stack.name] = shared
    return out


def _rearrange(root: nn.Module, stack: StackSpec, source_layers: list[nn.Module], indices: list[int]) -> None:
    used: set[int] = set()
    new_layers = []
    for pos, i in enumerate(indices):
        layer = source_layers[i] if i not in used else share_clone(source_layers[i], share_config=True)
        used.add(i)
        for attr in stack.index_attrs:
            if has_path(layer, attr):
                set_path(layer, attr, pos)
        new_layers.append(layer)
    set_path(root, stack.layers, nn.ModuleList(new_layers))


def _update_config(root: nn.Module, stack: StackSpec, indices: list[int]) -> None:
    for field in stack.depth_fields:
        owner = get_path(root, field.owner, default=None)
        config = getattr(owner, "config", None)
        if config is None:
            continue
        if field.per_layer:
            values = getattr(config, field.name, None)
            if values is not None:
                set_config_value(owner, field.name, [values[i] for i in indices])
        elif hasattr(config, field.name):
            set_config_value(owner, field.name, len(indices))


__all__ = ["apply_plan", "clone_model", "layer_sizes", "share_clone", "source_plan", "tie_repeated_layers"]
