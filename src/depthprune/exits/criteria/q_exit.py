"""Learning to exit (PALBERT): deterministic Q-exit.

PALBERT's lambda layers give lambda_i, the probability of stopping at layer i given that no earlier layer stopped
(PonderNet). The probability of having stopped by layer i is 1 - prod_{j<=i} (1 - lambda_j). Q-exit stops at the
first layer where that cumulative probability reaches the threshold q, instead of sampling the exit layer (which the
PALBERT paper shows adds variance that costs accuracy). Needs heads with the `halting` extra.
"""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range


def stopped_by_now(halting: list[torch.Tensor]) -> torch.Tensor:
    """[batch]: 1 - prod (1 - lambda_j) over the halting logits so far."""
    keep = torch.ones_like(halting[0], dtype=torch.float)
    for logit in halting:
        keep = keep * (1 - torch.sigmoid(logit.float()))
    return 1 - keep


@dataclasses.dataclass(frozen=True)
class QExit:
    threshold: float
    name = "q_exit"
    needs = ("halting",)

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: ExitState) -> torch.Tensor:
        if not state.halting:
            raise ValueError("the 'q_exit' criterion needs exit heads trained with the 'halting' extra (PALBERT)")
        return stopped_by_now(state.halting) >= self.threshold

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.999, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


CRITERION = QExit
