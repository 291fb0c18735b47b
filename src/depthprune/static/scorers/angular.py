"""Angular distance between the representations n layers apart (Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers").

d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi, where x_l enters layer l and x_{l+n} leaves layer l+n-1. The block
[l*, l*+n) with the smallest mean distance changes the representation least and is removed as a whole. Per-layer
scores are the n=1 distances (higher = the layer turns its input more).

The paper averages over the last token of each sequence only, the one that has attended to the whole context. With a
handful of calibration blocks that gives a handful of samples, so the distance is averaged over every token by default
(as ShortGPT's Block Influence is); `last_token=True` follows the paper. Works on any stack of any model type.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from depthprune.static.scorers import LayerScores
from depthprune.static.scorers.hidden import batch_states, check_arguments

NAME = "angular"


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angular distance in [0, 1] between hidden states [..., hidden], per token."""
    cos = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


@torch.no_grad()
def angular(
    model: nn.Module,
    batches: list[torch.Tensor],
    n_remove: int = 1,
    *,
    stack: str | None = None,
    progress: bool = False,
    last_token: bool = False,
) -> LayerScores:
    """Remove the contiguous block of `n_remove` layers whose input and output are closest in angle."""
    target, batches = check_arguments(model, batches, n_remove, stack, NAME)
    n_layers, n = target.n_layers, max(n_remove, 1)
    single = torch.zeros(n_layers, dtype=torch.float64)  # summed d(x_l, x_{l+1})
    block = torch.zeros(n_layers - n + 1, dtype=torch.float64)  # summed d(x_l, x_{l+n})
    count = 0
    for _, inputs, outputs in batch_states(model, batches, target, NAME, progress):
        if last_token:
            inputs, outputs = [x[:, -1:] for x in inputs], [x[:, -1:] for x in outputs]
        for i in range(n_layers):
            single[i] += _distance(inputs[i], outputs[i]).sum().double().cpu()
        for i in range(n_layers - n + 1):
            block[i] += _distance(inputs[i], outputs[i + n - 1]).sum().double().cpu()
        count += inputs[0].shape[0] * inputs[0].shape[1]
    single, block = single / count, block / count
    start = int(torch.argmin(block))  # first of the smallest, for ties
    remove = tuple(range(start, start + n_remove))
    details = {"tokens": count, "last_token": last_token, "block_distance": block.tolist(), "block_start": start}
    return LayerScores(NAME, target.name, tuple(single.tolist()), remove, details)


SCORER = angular
