"""CALM's softmax response: exit when top-1 minus top-2 next-token probability reaches the threshold."""

import dataclasses

import torch

from depthprune.exits.criteria.margin import margin_at_least
from depthprune.exits.token_criteria import TokenState, check_range


@dataclasses.dataclass(frozen=True)
class Margin:
    threshold: float
    name = "margin"
    needs = ("logits",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: TokenState) -> torch.Tensor:
        return margin_at_least(state.logits, self.threshold)

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.9998, 0.998, 0.99, 0.98, 0.96, 0.94, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]


CRITERION = Margin
