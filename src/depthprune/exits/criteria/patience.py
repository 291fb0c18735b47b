"""Internal ensemble (PABEE): exit once the prediction has stayed the same for `threshold` consecutive exits.

patience t: the current exit and the t exits before it all predict the same class (t = 0 exits at the first exit).
"""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range


@dataclasses.dataclass(frozen=True)
class Patience:
    threshold: float
    name = "patience"
    needs = ()

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0, 64, integer=True)

    def decide(self, state: ExitState) -> torch.Tensor:
        t = int(self.threshold)
        current = state.logits.argmax(-1)
        if len(state.history) < t + 1:
            return torch.zeros_like(current, dtype=torch.bool)
        same = torch.ones_like(current, dtype=torch.bool)
        for past in state.history[-(t + 1) : -1]:
            same &= past.argmax(-1) == current
        return same

    @staticmethod
    def grid() -> list[float]:
        return [6, 5, 4, 3, 2, 1, 0]


CRITERION = Patience
