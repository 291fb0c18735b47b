"""Token-level exit decisions for early-exit generation, one file each, batched:
`criterion.decide(state) -> BoolTensor[batch]` (True = this row's current token exits after `state.layer`).

- confidence of the exit's softmax (CALM, Schuster et al. 2022): max_prob, margin;
- hidden-state saturation (CALM): cosine similarity of the states leaving two consecutive layers, no vocabulary
  projection needed;
- learned (CALM's meta-classifier): the exit heads' `confidence`;
- fixed: always exit at one layer, the static baseline.

Same small interface as `depthprune.exits.criteria` (classification): written `name:threshold` on the command line,
built by `parse_criterion`, and `grid()` lists candidate thresholds from the most conservative (exits least) to the most
aggressive, the order calibration walks.

The state computes the exit's logits (a vocabulary projection, the costly part of an exit) only when a criterion reads
`state.logits`; `saturation` and `fixed` never do, so the generation loop projects only the rows that exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from depthprune.exits.criteria import check_range, probs
from depthprune.registry import TOKEN_CRITERIA, parse_threshold

__all__ = [
    "TokenCriterion",
    "TokenState",
    "check_range",
    "criterion_class",
    "list_criteria",
    "make_criterion",
    "parse_criterion",
    "probs",
    "register_criterion",
]


class TokenState:
    """What a criterion sees after decoder layer `layer` (0-based) for the rows still running, one token per row.

    hidden: [batch, hidden_size] state leaving layer `layer`; prev_hidden: [batch, hidden_size] state entering it
    (the state leaving layer - 1, or the embeddings for layer 0). rows: [batch] indices of these rows in the
    generation batch. logits [batch, vocab] and confidence [batch] are computed on first access (by `logits_fn` /
    `confidence_fn`) and kept; pass them directly instead for hand-made states.
    """

    def __init__(
        self,
        layer: int,
        num_layers: int,
        hidden: torch.Tensor,
        prev_hidden: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        confidence: torch.Tensor | None = None,
        logits_fn: Callable[[], torch.Tensor] | None = None,
        confidence_fn: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.layer = int(layer)
        self.num_layers = int(num_layers)
        self.hidden = hidden
        self.prev_hidden = prev_hidden
        self.rows = torch.arange(hidden.shape[0], device=hidden.device) if rows is None else rows
        self._logits = logits
        self._confidence = confidence
        self._logits_fn = logits_fn
        self._confidence_fn = confidence_fn

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def has_logits(self) -> bool:
        """Whether the exit's logits were computed (or given) already."""
        return self._logits is not None

    @property
    def logits(self) -> torch.Tensor:
        """[batch, vocab]: this exit's next-token logits (computed on first access)."""
        if self._logits is None:
            if self._logits_fn is None:
                raise ValueError(f"no exit logits at layer {self.layer}: the state was built without them")
            self._logits = self._logits_fn()
        return self._logits

    @property
    def confidence(self) -> torch.Tensor | None:
        """[batch]: CALM's learned P(this exit's token equals the full model's), or None if the heads have none."""
        if self._confidence is None and self._confidence_fn is not None:
            self._confidence = self._confidence_fn()
            self._confidence_fn = None
        return self._confidence


class TokenCriterion(Protocol):
    name: str
    threshold: float
    needs: tuple[str, ...]  # what it reads besides the layer index: "logits", "confidence", "hidden"

    def decide(self, state: TokenState) -> torch.Tensor: ...

    @staticmethod
    def grid() -> list[float]: ...


def list_criteria() -> list[str]:
    return TOKEN_CRITERIA.names()


def criterion_class(name: str) -> Any:
    return TOKEN_CRITERIA.get(name)


def register_criterion(name: str, cls: Any, *, description: str | None = None) -> Any:
    """Register a third-party token exit criterion (see depthprune.registry.register_criterion)."""
    from depthprune.registry import register_criterion as register

    return register(name, cls, kind="token", description=description)


def make_criterion(name: str, threshold: float) -> TokenCriterion:
    return criterion_class(name)(threshold)


def parse_criterion(text: str) -> TokenCriterion:
    """'max_prob:0.9' -> MaxProb(0.9)."""
    return parse_threshold(text, criterion_class)
