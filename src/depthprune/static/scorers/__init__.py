"""Layer importance scorers, registered by name; one module each.

Every scorer has the same interface: calibration data in, a score per layer and the layers it would remove out.

    scorer = get_scorer("block_influence")
    result = scorer(model, batches, n_remove=8)   # batches: list of LongTensor [batch, seq] token ids
    result.scores        # one float per source layer of the stack; higher = more important
    result.remove        # the n_remove source layers this scorer chooses to drop (sorted)

Scorers never modify the model they are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from depthprune.registry import SCORERS


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """What a scorer says about one stack: importance per source layer, and its choice of layers to remove."""

    scorer: str
    stack: str
    scores: tuple[float, ...]
    remove: tuple[int, ...]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.scores)
        if any(not 0 <= i < n for i in self.remove):
            raise ValueError(f"{self.scorer}: layers to remove {self.remove} out of range 0-{n - 1}")
        if len(set(self.remove)) != len(self.remove):
            raise ValueError(f"{self.scorer}: layers to remove {self.remove} has duplicates")
        object.__setattr__(self, "remove", tuple(sorted(self.remove)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Scorer(Protocol):
    name: str

    def __call__(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        n_remove: int = 1,
        *,
        stack: str | None = None,
        progress: bool = False,
    ) -> LayerScores: ...


def register_scorer(name: str, scorer: Callable[..., LayerScores], *, description: str | None = None) -> None:
    """Register a third-party scorer under `name` (same call signature as the built-in ones); see
    depthprune.registry.register_scorer."""
    from depthprune.registry import register_scorer as register

    register(name, scorer, description=description)


def list_scorers() -> list[str]:
    return SCORERS.names()


def get_scorer(name: str) -> Scorer:
    return SCORERS.get(name)
