"""Healing after static depth pruning: a method takes the untouched model, a plan and calibration batches and returns
a new model of the same class running the plan, repaired. One file per method, registered by name in
`depthprune.registry.HEALERS` (`fold`: training-free linear fold); third parties add theirs with `register_healer`.
"""

from __future__ import annotations

from collections.abc import Sequence
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


__all__ = ["get_healer", "heal", "list_healers"]
