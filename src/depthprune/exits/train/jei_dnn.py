"""JEI-DNN (Regol, Chataoui & Coates, 2023, "Jointly-Learned Exit and Inference for a Dynamic Neural Network").

The gating mechanism and the inference modules are learned together: the `gate` extra of exit i gives the probability
of exiting there given that no earlier gate opened, which defines where each sample stops (as in PALBERT), and the
loss is the expected cost under that distribution: sum_i p_i * (CE_i + lambda_cost * depth_i / L), so the gates
learn to trade accuracy for computation. At inference the `gate` criterion thresholds the same gates.
"""

from __future__ import annotations

import torch

from depthprune.exits.inference import AllExits
from depthprune.exits.train import Stage, cross_entropies, depths, exit_distribution, extra_logits

NEEDS = ("gate",)


def stop_probs(outputs: AllExits) -> torch.Tensor:
    """p_i [exits + 1, batch]: where each sample stops under the gates (the last row: the final layer)."""
    return exit_distribution(extra_logits(outputs, "gate")).exp()


def loss(outputs: AllExits, labels: torch.Tensor, lambda_cost: float = 0.1, ce_weight: float = 0.0) -> torch.Tensor:
    """sum_i p_i (CE_i + lambda_cost * depth_i / L), averaged over the batch (+ ce_weight * mean CE over all
    classifiers, an optional aid for exits the gates rarely pick; 0 by default)."""
    p = stop_probs(outputs)  # [exits + 1, batch]
    ce = cross_entropies(outputs, labels)  # [exits + 1, batch]
    d = depths(outputs)
    cost = torch.tensor(d, dtype=torch.float, device=ce.device)[:, None] / d[-1]  # [exits + 1, 1]
    total = (p * (ce + lambda_cost * cost)).sum(0).mean()
    if ce_weight:
        total = total + ce_weight * ce.mean()
    return total


STAGES = [Stage("jei-dnn", loss, "all")]
