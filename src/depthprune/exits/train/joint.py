"""Joint training of every exit with the backbone, as in PABEE (Zhou et al., 2020, "BERT Loses Patience") and
shallow-deep networks (Kaya et al., 2019), with PABEE's weights: a weighted average of the cross-entropies of all
exits and the final layer, the weight of an exit proportional to its depth (layers run before it), so deeper,
stronger classifiers count more.
"""

from __future__ import annotations

import torch

from depthprune.exits.inference import AllExits
from depthprune.exits.train import Stage, cross_entropies, depths

NEEDS: tuple[str, ...] = ()


def weights(outputs: AllExits) -> torch.Tensor:
    """[exits + 1]: depth_j / sum of depths, the final layer last."""
    d = torch.tensor(depths(outputs), dtype=torch.float)
    return d / d.sum()


def loss(outputs: AllExits, labels: torch.Tensor) -> torch.Tensor:
    """sum_j w_j * CE_j over the exits and the final layer, w_j proportional to depth_j."""
    ce = cross_entropies(outputs, labels).mean(1)  # [exits + 1]
    return (weights(outputs).to(ce.device) * ce).sum()


STAGES = [Stage("joint", loss, "all")]
