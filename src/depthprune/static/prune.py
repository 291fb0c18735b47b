"""Static layer pruning, end to end: calibration data -> importance scores -> plan -> pruned model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from depthprune.data import calibration_text, token_blocks
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.scorers import LayerScores, get_scorer


def calibration_batches(
    tokenizer: Any,
    text: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    seq_len: int = 256,
    n_blocks: int = 8,
    batch_size: int = 4,
) -> list[torch.Tensor]:
    """Calibration token ids as a list of LongTensor [batch, seq_len].

    `text` wins over `path` (the calibration part of a book, see depthprune.data); neither gives the packaged sample.
    """
    text = text if text is not None else calibration_text(path)
    blocks = token_blocks(tokenizer, text, seq_len, n_blocks)  # [n_blocks, seq_len]
    return list(blocks.split(batch_size))


def n_to_remove(total: int, remove: int | float) -> int:
    """Layers to remove from a stack of `total`: an int count, or a fraction in (0, 1) rounded to the nearest layer."""
    n = round(total * remove) if isinstance(remove, float) and 0 < remove < 1 else remove
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < total:
        raise ValueError(
            f"remove must be a layer count between 1 and {total - 1}, or a fraction in (0, 1); got {remove!r}"
        )
    return n


@dataclasses.dataclass
class PruneResult:
    model: nn.Module
    plan: LayerPlan
    scores: LayerScores | None


def prune(
    model: nn.Module,
    *,
    remove: int | float | None = None,
    plan: LayerPlan | str | None = None,
    scorer: str = "lookahead_kl",
    batches: list[torch.Tensor] | None = None,
    stack: str | None = None,
    progress: bool = False,
) -> PruneResult:
    """Remove `remove` layers chosen by `scorer` on `batches`, or apply an explicit `plan`; `model` is untouched."""
    if (remove is None) == (plan is None):
        raise ValueError("give exactly one of remove=N (layers chosen by a scorer) or plan=... (explicit layers)")
    if plan is not None:
        return PruneResult(apply_plan(model, plan), LayerPlan.parse(plan) if isinstance(plan, str) else plan, None)
    if batches is None:
        raise ValueError("pruning by score needs calibration batches; see depthprune.static.prune.calibration_batches")
    sizes = layer_sizes(model)
    stack = stack or list(sizes)[-1]
    if stack not in sizes:
        raise ValueError(f"unknown stack {stack!r}; the model has {list(sizes)}")
    n = n_to_remove(sizes[stack], remove)
    scores = get_scorer(scorer)(model, batches, n_remove=n, stack=stack, progress=progress)
    chosen = LayerPlan.drop(sizes, {stack: scores.remove})
    return PruneResult(apply_plan(model, chosen), chosen, scores)
