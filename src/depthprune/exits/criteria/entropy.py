"""Confidence estimation (DeeBERT): exit when the entropy of the exit's softmax falls to the threshold or below.

Entropy is normalized by log(number of labels), so thresholds lie in [0, 1] whatever the label count.
"""

import dataclasses
import math

import torch

from depthprune.exits.criteria import ExitState, check_range, probs


@dataclasses.dataclass(frozen=True)
class Entropy:
    threshold: float
    name = "entropy"
    needs = ()

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: ExitState) -> torch.Tensor:
        p = probs(state.logits)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1) / max(math.log(p.shape[-1]), 1e-12)
        return h <= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]


CRITERION = Entropy
