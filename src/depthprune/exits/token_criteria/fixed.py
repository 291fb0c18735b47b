"""Static depth: every token exits after decoder layer N (0-based, the index `exit_layers` reports), or at the first
exit after it when layer N has none. The baseline every dynamic criterion is compared with."""

import dataclasses

import torch

from depthprune.exits.token_criteria import TokenState, check_range


@dataclasses.dataclass(frozen=True)
class Fixed:
    threshold: float
    name = "fixed"
    needs = ()

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0, 1024, integer=True)

    def decide(self, state: TokenState) -> torch.Tensor:
        exit_now = state.layer >= int(self.threshold)
        return torch.full((state.batch_size,), exit_now, dtype=torch.bool, device=state.hidden.device)

    @staticmethod
    def grid() -> list[float]:
        return [47, 31, 23, 15, 11, 9, 7, 6, 5, 4, 3, 2, 1, 0]


CRITERION = Fixed
