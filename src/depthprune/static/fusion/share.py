"""Weight sharing: the positions of each group run one set of weights, shared in memory (one module's parameters
behind every position), so the model executes as many layers as before but holds fewer parameters.

`mode="first"` lets every position of a group run the group's first layer (the plan that repeats that layer, which
`apply_plan` builds: each position a module of its own with its own layer index, parameters shared); `"average"`
gives that shared layer the mean of the group's layers, parameter by parameter (attention, MLP and norms alike).

On disk: safetensors cannot alias tensors and plain transformers cannot tie arbitrary layers on load, so an export
written with `save_model` stores each position's weights (the file is as large as the untouched model's) and loads
with plain `from_pretrained` as an ordinary model whose positions hold equal values. `config.depthprune` records the
positions that share ("shared_layers"), and `depthprune.load_model` ties them again: in memory the shared positions
are one tensor each, and `unique_parameters` is back down.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan
from depthprune.static.fusion.runs import RECORD_KEY, check_runs, fusion_record, resolve_stack, source_layers

NAME = "share"
MODES = ("average", "first")


def averaged_parameters(layers: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """{name: mean over `layers` of that parameter} for every parameter of `layers[0]` (float64 sums, cast back)."""
    others = [dict(layer.named_parameters()) for layer in layers]
    out = {}
    with torch.no_grad():
        for name, p in layers[0].named_parameters():
            out[name] = (sum(o[name].detach().double() for o in others) / len(layers)).to(p.dtype)
    return out


def share_layers(
    model: nn.Module, groups: Sequence[Sequence[int]] | str, *, mode: str = "average", stack: str | None = None
) -> nn.Module:
    """A new model in which each group (first, last) of positions, both included, runs one shared layer: the first
    one's weights (`mode="first"`) or the group's average (`"average"`). Same depth; `model` is never modified."""
    if mode not in MODES:
        raise ValueError(f"share: mode must be one of {MODES}, got {mode!r}")
    target = resolve_stack(model, stack, NAME)
    groups = check_runs(model, target, groups, NAME)
    owner = {i: a for a, b in groups for i in range(a, b + 1)}
    plan = tuple(owner.get(i, i) for i in range(len(target)))
    values = {a: averaged_parameters(target.layers[a : b + 1]) for a, b in groups if b > a and mode == "average"}
    new = apply_plan(model, LayerPlan({target.name: plan}).resolve(target.adapter.num_layers(model)))
    layers = target.adapter.layers(new, target.spec)
    with torch.no_grad():
        for a, params in values.items():
            for name, p in layers[a].named_parameters():  # every position of the group holds these same tensors
                p.copy_(params[name])

    sources = source_layers(model, target)
    record = fusion_record(model)
    fused = dict(record["merged_layers"].get(target.name, {}))
    for a, b in groups:
        held = sorted({s for i in range(a, b + 1) for s in sources[i]}) if mode == "average" else sources[a]
        for i in range(a, b + 1):
            fused.pop(str(i), None)
            if len(held) > 1:
                fused[str(i)] = held
    record["steps"].append({"method": NAME, "mode": mode, "stack": target.name, "groups": [list(g) for g in groups]})
    record["merged_layers"] = {**record["merged_layers"], target.name: fused}
    setattr(new.config, RECORD_KEY, record)
    return new


__all__ = ["MODES", "averaged_parameters", "share_layers"]
