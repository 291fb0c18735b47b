"""Learning to exit (JEI-DNN): exit when the exit gate, learned jointly with the heads, opens past the threshold.
Needs heads with the `gate` extra."""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range


@dataclasses.dataclass(frozen=True)
class Gate:
    threshold: float
    name = "gate"
    needs = ("gate",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: ExitState) -> torch.Tensor:
        if state.gate is None:
            raise ValueError("the 'gate' criterion needs exit heads trained with the 'gate' extra (JEI-DNN)")
        return torch.sigmoid(state.gate.float()) >= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


CRITERION = Gate
