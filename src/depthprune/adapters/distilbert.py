"""DistilBERT."""

import torch
from torch import nn

from depthprune.adapters.base import Adapter, ClassificationHead, ConfigField, StackSpec


def _head(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    pooled = torch.relu(m["pre_classifier"](hidden[:, 0]))  # [batch, hidden]
    return m["classifier"](m["dropout"](pooled))


ADAPTERS = [
    Adapter(
        family="distilbert",
        model_types=("distilbert",),
        stacks=(
            StackSpec(
                name="encoder",
                layers="transformer.layer",
                depth_fields=(ConfigField("num_hidden_layers"),),
                module_depth_attrs=("transformer.n_layers",),
            ),
        ),
        heads=("classifier", "vocab_projector", "qa_outputs"),
        classification_head=ClassificationHead(
            {"pre_classifier": "pre_classifier", "dropout": "dropout", "classifier": "classifier"}, _head
        ),
    )
]
