"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer
Blocks"): remove layers one at a time, each time the one whose removal gives the lowest calibration perplexity.

Every candidate is a what-if copy of the model sharing its weights (`apply_plan(..., share_weights=True)`) that runs
the current plan minus one layer. The per-layer score is the calibration NLL increase when that layer alone is
removed from the full model (the first iteration). Each iteration costs one forward pass per remaining layer; a cache
of the hidden states entering each layer of the current plan lets a candidate skip the layers before the one it
drops (same numbers, about half the work).
"""

from __future__ import annotations

import torch
from torch import nn

from depthprune.static.scorers import LayerScores
from depthprune.static.scorers.hidden import as_batches, eval_mode, require_causal_lm, resolve_target
from depthprune.static.scorers.lm_loss import plan_inputs, plan_loss

NAME = "sleb"


@torch.no_grad()
def sleb(
    model: nn.Module,
    batches: list[torch.Tensor],
    n_remove: int = 1,
    *,
    stack: str | None = None,
    progress: bool = False,
) -> LayerScores:
    """Greedy removal by calibration perplexity, n_remove times."""
    require_causal_lm(model, NAME)
    target = resolve_target(model, stack, n_remove, NAME)
    batches = as_batches(batches, NAME, min_len=2)
    if target.n_layers < 2:
        raise ValueError(f"{NAME}: stack {target.name!r} has a single layer; there is nothing to compare")
    steps = max(n_remove, 1)  # the scores need the first iteration even for n_remove=0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(target.n_layers - s for s in range(steps)), desc=NAME, unit="candidate")
    keep = list(range(target.n_layers))
    order: list[int] = []
    path_nll: list[float] = []
    with eval_mode(model):
        cache = plan_inputs(model, batches, target, keep)
        full_nll = plan_loss(model, batches, target, keep, cache=cache).nll
        for step in range(steps):
            if step:
                cache = plan_inputs(model, batches, target, keep)
            nll = {}
            for pos, layer in enumerate(keep):
                nll[layer] = plan_loss(model, batches, target, keep[:pos] + keep[pos + 1 :], cache=cache).nll
                if bar is not None:
                    bar.update()
            if step == 0:
                scores = tuple(nll[i] - full_nll for i in range(target.n_layers))
            if step < n_remove:
                best = min(keep, key=lambda i: (nll[i], i))
                keep.remove(best)
                order.append(best)
                path_nll.append(nll[best])
    if bar is not None:
        bar.close()
    details = {"order": order, "calibration_nll": path_nll, "full_nll": full_nll}
    return LayerScores(NAME, target.name, scores, tuple(order), details)


SCORER = sleb
