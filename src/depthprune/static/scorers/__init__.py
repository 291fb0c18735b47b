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
import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


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


# name -> module that defines SCORER
_BUILTIN = {
    "block_influence": "depthprune.static.scorers.block_influence",
    "angular": "depthprune.static.scorers.angular",
    "sleb": "depthprune.static.scorers.greedy_ppl",
    "lookahead_kl": "depthprune.static.scorers.lookahead_kl",
}
_CUSTOM: dict[str, Callable[..., LayerScores]] = {}


def register_scorer(name: str, scorer: Callable[..., LayerScores]) -> None:
    """Register a third-party scorer under `name` (same call signature as the built-in ones)."""
    if name in _BUILTIN or name in _CUSTOM:
        raise ValueError(f"a scorer named {name!r} already exists; pick another name")
    _CUSTOM[name] = scorer


def list_scorers() -> list[str]:
    return list(_BUILTIN) + list(_CUSTOM)


def get_scorer(name: str) -> Scorer:
    if name in _CUSTOM:
        return _CUSTOM[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(list_scorers())}")
    return importlib.import_module(_BUILTIN[name]).SCORER
