"""Confidence estimation: exit when top-1 minus top-2 softmax probability reaches the threshold."""

import dataclasses

import torch

from depthprune.exits.criteria import ExitState, check_range, probs


def margin_at_least(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """[batch]: top-1 minus top-2 softmax probability >= threshold (always True with a single class)."""
    p = probs(logits)
    if p.shape[-1] < 2:
        return torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    top = p.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1] >= threshold


@dataclasses.dataclass(frozen=True)
class Margin:
    threshold: float
    name = "margin"
    needs = ()

    def __post_init__(self) -> None:
        check_range(self.name, self.threshold, 0.0, 1.0)

    def decide(self, state: ExitState) -> torch.Tensor:
        return margin_at_least(state.logits, self.threshold)

    @staticmethod
    def grid() -> list[float]:
        return [1.0, 0.9998, 0.998, 0.99, 0.98, 0.96, 0.94, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2, 0.0]


CRITERION = Margin
