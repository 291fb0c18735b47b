"""Healing after static depth pruning: a method takes the untouched model, a plan and calibration batches and returns
a new model of the same class running the plan, repaired. One file per method, registered by name in
`depthprune.registry.HEALERS` (`fold`: training-free linear fold; `replace`: one trained layer per removed run;
`distill`: LoRA distillation); third parties add theirs with `register_healer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.plan import LayerPlan
from depthprune.registry import HEALERS


def list_healers() -> list[str]:
    """The registered healing methods' names."""
    return HEALERS.names()


def get_healer(name: str) -> Any:
    """The healer registered as `name`: `(model, plan, batches, *, progress=False, **options) -> nn.Module`."""
    return HEALERS.get(name)


def check_options(
    name: str, function: Callable[..., Any], options: Mapping[str, Any], extra: Iterable[str] = ()
) -> None:
    """Refuse options `function` (a healer's main function) does not take, naming the ones it does (`extra`: more
    accepted keys, e.g. the training loop's keyword arguments that `**run_kwargs` hands on)."""
    params = inspect.signature(function).parameters.values()
    skip = {"model", "plan", "batches"}
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = {p.name for p in params if p.kind in kinds and p.name not in skip} | set(extra)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"healer {name!r} has no option(s) {unknown}; it takes: {', '.join(sorted(accepted))}")


def heal(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: Sequence[torch.Tensor],
    method: str = "fold",
    *,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """A new model running `plan` on `model`'s layers, healed by `method` on `batches`; `model` is untouched."""
    return get_healer(method)(model, plan, batches, progress=progress, **options)


__all__ = ["check_options", "get_healer", "heal", "list_healers"]
