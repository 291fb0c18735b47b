"""CALM's meta-classifier: exit when the exit heads' learned confidence, P(this exit's token equals the full model's),
reaches the threshold. Needs heads whose `confidence(layer, hidden)` is not None."""

import dataclasses

import torch

from depthprune.exits.token_criteria import TokenState, check_range


@dataclasses.dataclass(frozen=True)
class Learned:
    threshold: float
    name = "learned"
    needs = ("confidence",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: TokenState) -> torch.Tensor:
        conf = state.confidence
        if conf is None:
            raise ValueError(
                "the 'learned' criterion needs exit heads with CALM's confidence classifier "
                "(heads.confidence(layer, hidden) returned None)"
            )
        return conf.float() >= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


CRITERION = Learned
