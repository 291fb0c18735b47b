"""CALM's hidden-state saturation: exit when the state leaving this layer and the state entering it (leaving the layer
before) have cosine similarity >= threshold. Reads hidden states only: no vocabulary projection until a row exits."""

import dataclasses

import torch

from depthprune.exits.token_criteria import TokenState, check_range


@dataclasses.dataclass(frozen=True)
class Saturation:
    threshold: float
    name = "saturation"
    needs = ("hidden",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, -1.0, 1.0)

    def decide(self, state: TokenState) -> torch.Tensor:
        if state.prev_hidden is None:
            raise ValueError("the 'saturation' criterion needs the state entering the layer (prev_hidden)")
        cos = torch.nn.functional.cosine_similarity(state.hidden.float(), state.prev_hidden.float(), dim=-1, eps=1e-8)
        return cos >= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5]


CRITERION = Saturation
