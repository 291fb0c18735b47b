"""Internal ensemble: majority voting over the exits so far.

Exit when at least two exits have voted and the leading class holds at least `threshold` of the votes; the
prediction is then the vote winner (`predict`), not only the current exit's argmax.
"""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range

MIN_VOTES = 2


def _votes(state: ExitState) -> torch.Tensor:
    labels = state.logits.shape[-1]
    votes = torch.zeros_like(state.logits, dtype=torch.float)  # [batch, labels]
    for past in state.history:
        votes += torch.nn.functional.one_hot(past.argmax(-1), labels).float()
    return votes


@dataclasses.dataclass(frozen=True)
class Voting:
    threshold: float
    name = "voting"
    needs = ()

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: ExitState) -> torch.Tensor:
        votes = _votes(state)
        share = votes.max(-1).values / votes.sum(-1)
        enough = torch.full_like(share, len(state.history) >= MIN_VOTES, dtype=torch.bool)
        return enough & (share >= self.threshold)

    def predict(self, state: ExitState) -> torch.Tensor:
        """Logits standing for the vote: vote counts plus the mean probability as a tie-break."""
        mean_probs = torch.stack([h.float().softmax(-1) for h in state.history]).mean(0)
        return _votes(state) + 1e-3 * mean_probs

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.9, 0.8, 0.75, 0.7, 0.66, 0.6, 0.5]


CRITERION = Voting
