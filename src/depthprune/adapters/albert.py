"""ALBERT: `num_hidden_layers` virtual layers run a few shared layer groups.

Virtual layer i runs group int(i / (num_hidden_layers / num_hidden_groups)), so plan indices refer to virtual
layers. A plan is written back as the fewest groups that reproduce its sequence of groups in ALBERT's own
contiguous-chunk layout, so shared weights stay stored once whenever that layout can express the plan. Where it
cannot, a group appears several times (sharing its parameters); an export stores each copy, and the "shared_layers"
record that apply_plan writes for every adapter lets depthprune.load_model share them again.
"""

import torch
from torch import nn

from depthprune.adapters.base import Adapter, ClassificationHead, ConfigField, StackSpec, backbone, get_path

_GROUPS = "encoder.albert_layer_groups"


def _group_of(i: int, n_layers: int, n_groups: int) -> int:
    return int(i / (n_layers / n_groups))


def _sizes(model: nn.Module) -> dict[str, int]:
    return {"encoder": backbone(model).config.num_hidden_layers}


def _sequence(model: nn.Module, stack: StackSpec) -> list[nn.Module]:
    config = backbone(model).config
    groups = get_path(backbone(model), _GROUPS)
    return [
        groups[_group_of(i, config.num_hidden_layers, config.num_hidden_groups)]
        for i in range(config.num_hidden_layers)
    ]


def _apply(model: nn.Module, stack: StackSpec, indices: list[int]) -> None:
    from depthprune.sharing import share_clone

    config = backbone(model).config
    groups = list(get_path(backbone(model), _GROUPS))
    seq = [_group_of(i, config.num_hidden_layers, config.num_hidden_groups) for i in indices]
    n = len(seq)
    for k in range(1, n + 1):
        chosen = [seq[next(i for i in range(n) if _group_of(i, n, k) == j)] for j in range(k)]
        if all(seq[i] == chosen[_group_of(i, n, k)] for i in range(n)):
            break
    modules, used = [], set()
    for g in chosen:
        modules.append(groups[g] if g not in used else share_clone(groups[g], share_config=True))
        used.add(g)
    get_path(backbone(model), "encoder").albert_layer_groups = nn.ModuleList(modules)
    config.num_hidden_layers = n
    config.num_hidden_groups = k


def _head(m: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
    pooled = m["pooler_activation"](m["pooler"](hidden[:, 0]))  # [batch, hidden]
    return m["classifier"](m["dropout"](pooled))


_CLASSIFICATION_HEAD = ClassificationHead(
    {
        "pooler": "albert.pooler",
        "pooler_activation": "albert.pooler_activation",
        "dropout": "dropout",
        "classifier": "classifier",
    },
    _head,
)

ADAPTERS = [
    Adapter(
        family="albert",
        model_types=("albert",),
        stacks=(StackSpec(name="encoder", layers=_GROUPS, depth_fields=(ConfigField("num_hidden_layers"),)),),
        heads=("classifier", "predictions", "qa_outputs"),
        stack_sizes=_sizes,
        apply_stack=_apply,
        layer_sequence=_sequence,
        classification_head=_CLASSIFICATION_HEAD,
    )
]
