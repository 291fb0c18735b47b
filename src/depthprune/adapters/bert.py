"""BERT-style encoders: BERT (and MiniLM, which is a BERT), RoBERTa, XLM-RoBERTa, CamemBERT.

They share the layer stack; their sequence classifiers differ: BERT pools the first token (pooler + dropout +
classifier), RoBERTa's classifier reads the first token itself."""

import torch
from torch import nn

from depthprune.adapters.base import Adapter, ClassificationHead, ConfigField, StackSpec

_STACK = StackSpec(
    name="encoder",
    layers="encoder.layer",
    index_attrs=("attention.self.layer_idx", "crossattention.self.layer_idx", "layer_idx"),
    depth_fields=(ConfigField("num_hidden_layers"),),
)
_HEADS = ("classifier", "cls", "lm_head", "qa_outputs")


def _bert_head(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](m["dropout"](m["pooler"](hidden)))


def _roberta_head(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](hidden)


ADAPTERS = [
    Adapter(
        family="bert",
        model_types=("bert",),
        stacks=(_STACK,),
        heads=_HEADS,
        classification_head=ClassificationHead(
            {"pooler": "bert.pooler", "dropout": "dropout", "classifier": "classifier"}, _bert_head
        ),
    ),
    Adapter(
        family="roberta",
        model_types=("roberta", "xlm-roberta", "camembert"),
        stacks=(_STACK,),
        heads=_HEADS,
        classification_head=ClassificationHead({"classifier": "classifier"}, _roberta_head),
    ),
]
