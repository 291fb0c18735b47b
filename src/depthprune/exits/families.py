"""The classification head of a model, for early exit: which of its modules form the pooler + classifier and how
they are glued. Each encoder adapter declares its own (`Adapter.classification_head`, in depthprune/adapters/), so an
architecture is described in one place; this module only looks it up and checks the model has those modules.

An exit head is a copy of these modules, run by the same function as the final head, so an exit after layer k pools
exactly as the model does after its last layer.
"""

from __future__ import annotations

import types

from torch import nn

from depthprune.adapters.base import ClassificationHead, get_path
from depthprune.adapters.registry import get_adapter, supported_model_types
from depthprune.errors import UnsupportedArchitectureError

HeadFamily = ClassificationHead  # the name this module used before the heads moved into the adapters


def classifier_model_types() -> list[str]:
    """The model types whose adapter declares a classification head."""
    return [t for t in supported_model_types() if _declared(t) is not None]


def _declared(model_type: str | None) -> ClassificationHead | None:
    try:
        return get_adapter(types.SimpleNamespace(model_type=model_type)).classification_head
    except UnsupportedArchitectureError:
        return None


def family_for(model_type: str | None) -> ClassificationHead:
    """The classification head declared for `model_type`; a clear error naming the supported ones otherwise."""
    family = _declared(model_type)
    if family is None:
        raise ValueError(
            f"early exit for classifiers supports model types {classifier_model_types()}; got {model_type!r}. "
            "Load the model as a sequence classifier (AutoModelForSequenceClassification) of one of these families, "
            "or give its adapter a classification_head (depthprune.adapters.base.ClassificationHead)"
        )
    return family


def head_family(model: nn.Module) -> ClassificationHead:
    family = family_for(getattr(model.config, "model_type", None))
    missing = [p for p in family.modules.values() if get_path(model, p, default=None) is None]
    if missing:
        raise ValueError(
            f"{type(model).__name__} lacks the classification head modules {missing}; load it with "
            "AutoModelForSequenceClassification (depthprune.load_model(name, task='seq-cls', num_labels=N))"
        )
    return family


def final_head(model: nn.Module) -> nn.ModuleDict:
    """The model's own head modules (not copies)."""
    family = head_family(model)
    return nn.ModuleDict({name: get_path(model, path) for name, path in family.modules.items()})
