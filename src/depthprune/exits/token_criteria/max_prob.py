"""CALM's softmax confidence: exit when the exit's top next-token probability reaches the threshold."""

import dataclasses

import torch

from depthprune.exits.token_criteria import TokenState, check_range, probs


@dataclasses.dataclass(frozen=True)
class MaxProb:
    threshold: float
    name = "max_prob"
    needs = ("logits",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: TokenState) -> torch.Tensor:
        return probs(state.logits).max(-1).values >= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3]


CRITERION = MaxProb
