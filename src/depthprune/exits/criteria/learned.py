"""Learning to exit: a small exit classifier per exit predicts whether this exit's prediction already equals the
final layer's; exit when that predicted probability reaches the threshold (needs heads with the `agreement` extra)."""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range


@dataclasses.dataclass(frozen=True)
class Learned:
    threshold: float
    name = "learned"
    needs = ("agreement",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: ExitState) -> torch.Tensor:
        if state.agreement is None:
            raise ValueError("the 'learned' criterion needs exit heads trained with the 'agreement' extra")
        return torch.sigmoid(state.agreement.float()) >= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


CRITERION = Learned
