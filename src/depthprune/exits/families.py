"""How each encoder family turns its last hidden states into class logits (its own pooling and classifier).

An exit head is a copy of the family's own head modules, run by the same function as the final head, so an exit
after layer k pools exactly as the model does after its last layer. Only the few lines that glue a family's head
modules together live here; the modules themselves are the model's own classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from depthprune.adapters.base import get_path


@dataclasses.dataclass(frozen=True)
class HeadFamily:
    """modules: name -> dotted path (from the top *ForSequenceClassification model) of each head module.
    forward: (modules, hidden [batch, seq, hidden]) -> logits [batch, labels]."""

    modules: dict[str, str]
    forward: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor]


def _bert(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](m["dropout"](m["pooler"](hidden)))


def _roberta(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](hidden)


def _distilbert(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    pooled = torch.relu(m["pre_classifier"](hidden[:, 0]))  # [batch, hidden]
    return m["classifier"](m["dropout"](pooled))


def _albert(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    pooled = m["pooler_activation"](m["pooler"](hidden[:, 0]))  # [batch, hidden]
    return m["classifier"](m["dropout"](pooled))


FAMILIES: dict[str, HeadFamily] = {
    "bert": HeadFamily({"pooler": "bert.pooler", "dropout": "dropout", "classifier": "classifier"}, _bert),
    "roberta": HeadFamily({"classifier": "classifier"}, _roberta),
    "xlm-roberta": HeadFamily({"classifier": "classifier"}, _roberta),
    "camembert": HeadFamily({"classifier": "classifier"}, _roberta),
    "distilbert": HeadFamily(
        {"pre_classifier": "pre_classifier", "dropout": "dropout", "classifier": "classifier"}, _distilbert
    ),
    "albert": HeadFamily(
        {
            "pooler": "albert.pooler",
            "pooler_activation": "albert.pooler_activation",
            "dropout": "dropout",
            "classifier": "classifier",
        },
        _albert,
    ),
}


def head_family(model: nn.Module) -> HeadFamily:
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"early exit for classifiers supports model types {sorted(FAMILIES)}; got {model_type!r}. "
            "Load the model as a sequence classifier (AutoModelForSequenceClassification) of one of these families"
        )
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
