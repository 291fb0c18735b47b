"""Exit decisions, one file each, batched: `criterion.decide(state) -> BoolTensor[batch]` (True = exit now).

The three families of the literature:
- confidence estimation: max_prob, margin, entropy (DeeBERT);
- internal ensemble: patience (PABEE), voting;
- learning to exit: learned (an exit classifier predicting agreement with the final layer), q_exit (PALBERT),
  gate (JEI-DNN);
and `static` (always exit after N layers) for comparison.

Criteria are registered in depthprune.registry (third parties: `register_criterion`) and written
`name:threshold` on the command line (`max_prob:0.9`, `patience:2`), built by `parse_criterion`.
Each has `grid()`: candidate thresholds ordered from the most conservative (exits least) to the most aggressive,
which calibration walks in that order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from depthprune.registry import CRITERIA, parse_threshold


@dataclasses.dataclass
class ExitState:
    """What a criterion sees after a layer, for the rows still running.

    layer: 0-based index of the layer just run; num_layers: depth of the stack.
    logits: [batch, labels] of this exit. history: the logits of every exit so far, oldest first (ends with `logits`).
    halting / gate / agreement: per-exit extra logits [batch] (histories for halting), when the heads have them.
    """

    layer: int
    num_layers: int
    logits: torch.Tensor
    history: list[torch.Tensor]
    halting: list[torch.Tensor] = dataclasses.field(default_factory=list)
    gate: torch.Tensor | None = None
    agreement: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> ExitState:
        """The state of a subset of rows (LongTensor of row indices)."""
        pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
        return ExitState(
            self.layer,
            self.num_layers,
            pick(self.logits),
            [pick(h) for h in self.history],
            [pick(h) for h in self.halting],
            pick(self.gate),
            pick(self.agreement),
        )


class Criterion(Protocol):
    name: str
    threshold: float
    needs: tuple[str, ...]  # extra head outputs the criterion reads ("halting", "gate", "agreement")

    def decide(self, state: ExitState) -> torch.Tensor: ...

    @staticmethod
    def grid() -> list[float]: ...


def list_criteria() -> list[str]:
    return CRITERIA.names()


def criterion_class(name: str) -> Any:
    return CRITERIA.get(name)


def register_criterion(name: str, cls: Any, *, description: str | None = None) -> Any:
    """Register a third-party classifier exit criterion (see depthprune.registry.register_criterion)."""
    from depthprune.registry import register_criterion as register

    return register(name, cls, kind="classifier", description=description)


def make_criterion(name: str, threshold: float) -> Criterion:
    return criterion_class(name)(threshold)


def parse_criterion(text: str) -> Criterion:
    """'max_prob:0.9' -> MaxProb(0.9)."""
    return parse_threshold(text, criterion_class)


def check_range(name: str, value: float, low: float, high: float, *, integer: bool = False) -> None:
    """Raise a ValueError naming the criterion if `value` is outside [low, high] (or not an integer when required)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: threshold must be a number, got {value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"{name}: threshold must be a whole number, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{name}: threshold {value} out of range [{low}, {high}]")


def probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1)
