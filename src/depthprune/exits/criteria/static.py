"""Always exit after N layers (static depth), the baseline every dynamic criterion is compared with."""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range


@dataclasses.dataclass(frozen=True)
class Static:
    threshold: float
    name = "static"
    needs = ()

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 1, 1024, integer=True)

    def decide(self, state: ExitState) -> torch.Tensor:
        exit_now = state.layer + 1 >= int(self.threshold)
        return torch.full((state.logits.shape[0],), exit_now, dtype=torch.bool, device=state.logits.device)

    @staticmethod
    def grid() -> list[float]:
        return [24, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]


CRITERION = Static
