"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer
Blocks"): remove layers one at a time, each time the one whose removal gives the lowest calibration perplexity.

Every candidate is the current plan minus one layer, run on the model's own layers by the runner (lm_loss). The
per-layer score is the calibration NLL increase when that layer alone is removed from the full model (the first
iteration). Each iteration costs one forward pass per remaining layer; a cache of the hidden states after each
leading part of the current plan lets a candidate skip the layers before the one it drops (same numbers, about half
the work), and the next plan's cache starts where it parts from the current one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthprune.static.scorers import LayerScores
from depthprune.static.scorers.hidden import check_arguments, eval_mode
from depthprune.static.scorers.lm_loss import plan_inputs, plan_loss

NAME = "sleb"


@torch.no_grad()
def sleb(
    model: nn.Module, batches: list[Tensor], n_remove: int = 1, *, stack: str | None = None, progress: bool = False
) -> LayerScores:
    """Greedy removal by calibration perplexity, n_remove times."""
    target, batches = check_arguments(model, batches, n_remove, stack, NAME, loss=True)
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
                cache = plan_inputs(model, batches, target, keep, cache=cache)
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
