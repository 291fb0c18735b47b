"""Static-importance initialisation of routers (`train-router --init static`): the gates start as the static plan
of the target depth, so that untrained routers (weights 0) run exactly what static pruning runs and training learns
per-token (per-sample) corrections on top of it, instead of starting from the same P(run) on every layer.

How scores become biases: an importance scorer (depthprune.static.scorers, default block_influence = ShortGPT)
scores every layer on calibration data and chooses the `round(num_layers - target)` layers static pruning removes.
Those get negative biases, the others positive ones, by rank of their score: the kept layer nearest the cut
(lowest score among the kept) gets +`low`, the most important +`high`; the removed layer nearest the cut gets
-`low`, the least important -`high`, linear in rank between. With zero weights P(run) = sigmoid(bias): at the
default `low`=1, `high`=4, between 0.73 and 0.98 for kept layers and between 0.02 and 0.27 for removed ones, so at
threshold 0.5 the routers reproduce the plan exactly, and the layers nearest the cut are the easiest to flip.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from depthprune.errors import RouterError
from depthprune.skipping.routers import check_target, default_layers, model_facts

LOW, HIGH = 1.0, 4.0


def rank_biases(ranked: list[int], low: float = LOW, high: float = HIGH) -> dict[int, float]:
    """Biases rising linearly from `low` to `high` along `ranked` (layers, nearest the cut first)."""
    if len(ranked) == 1:
        return {ranked[0]: low}
    step = (high - low) / (len(ranked) - 1)
    return {layer: low + k * step for k, layer in enumerate(ranked)}


def static_init(
    model: nn.Module,
    batches: list[torch.Tensor],
    target_layers: float,
    *,
    layers: tuple[int, ...] | list[int] | None = None,
    scorer: str = "block_influence",
    low: float = LOW,
    high: float = HIGH,
) -> dict[str, Any]:
    """RouterConfig options (layers, init, init_biases, init_scorer, init_removed) that make untrained routers run
    the static plan `scorer` chooses for `target_layers` on `batches` (list of token ids [batch, seq]). layers: the
    routed layers; None: the default ones (all but the first and last) and any other the plan removes. A RouterError
    when the plan removes a layer that given `layers` leave without a router."""
    from depthprune.static.scorers import get_scorer

    if not 0 < low <= high:
        raise RouterError(f"static init needs 0 < low <= high, got low={low}, high={high}")
    facts = model_facts(model)
    n = facts["num_layers"]
    given = layers is not None
    layers = tuple(sorted({int(i) for i in (layers if given else default_layers(n))}))
    check_target(target_layers, n, len(layers))
    n_remove = round(n - float(target_layers))
    if n_remove < 1:
        raise RouterError(
            f"target depth {target_layers} removes no layer of {n} statically: a static init needs a target at "
            f"most {n - 1} (or use --init uniform)"
        )
    stack = "decoder" if facts["granularity"] == "token" else None
    result = get_scorer(scorer)(model, batches, n_remove=n_remove, stack=stack)
    removed = tuple(sorted(result.remove))
    outside = [i for i in removed if i not in layers]
    if outside and not given:
        layers, outside = tuple(sorted({*layers, *removed})), []
    if outside:
        raise RouterError(
            f"the {scorer} plan for {target_layers:g} layers removes layers {outside}, which have no router "
            f"(routed: {list(layers)}); route them too (--layers) or pick another scorer"
        )
    scores = result.scores
    kept = sorted((i for i in layers if i not in removed), key=lambda i: (scores[i], i))  # nearest the cut first
    gone = sorted(removed, key=lambda i: (-scores[i], i))  # nearest the cut (highest score) first
    biases = rank_biases(kept, low, high) if kept else {}
    biases.update({i: -b for i, b in rank_biases(gone, low, high).items()})
    return {
        "layers": layers,
        "init": "static",
        "init_biases": tuple(biases[i] for i in layers),
        "init_scorer": scorer,
        "init_removed": removed,
    }


__all__ = ["HIGH", "LOW", "rank_biases", "static_init"]
