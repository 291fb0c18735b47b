"""Static-importance initialisation of routers (`train-router --init static`): the gates start as the static plan
of the target depth, so that untrained routers (weights 0) run exactly what static pruning runs and training learns
per-token (per-sample) corrections on top of it, instead of starting from the same P(run) on every layer.

How scores become biases: an importance scorer (depthprune.static.scorers, default block_influence = ShortGPT)
scores every layer on calibration data and chooses the `round(num_layers - target)` layers static pruning removes.
Those get negative biases, the others positive ones, by rank of their score: the kept layer nearest the cut
(lowest score among the kept) gets +`low`, the most important +`high`; the removed layer nearest the cut gets
-`low`, the least important -`high`, linear in rank between. With zero weights P(run) = sigmoid(bias): at the
default `low`=1, `high`=4, between 0.73 and 0.98 for kept layers and between 0.02 and 0.27 for removed ones, so at
threshold 0.5 the routers reproduce the plan exactly (with sink_tokens=0; train_routers' default 1 runs each
sequence's first position on every layer), and the layers nearest the cut are the easiest to flip.

A healed start (`train-router --start PRUNED`, `healed_start`): a model `depthprune prune` made from the routed one
(healed or not: fold, distill, ...) gives the plan and the kept layers' weights. The student is the full-depth model
with those layers in their source positions, the removed ones as they were, and the routers start as that plan, so
untrained routers compute exactly what the pruned model computes and training starts from the best static model
instead of the unhealed plan.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from depthprune.errors import RouterError
from depthprune.skipping.routers import check_target, default_layers, model_facts

LOW, HIGH = 1.0, 4.0


def rank_biases(ranked: list[Any], low: float = LOW, high: float = HIGH) -> dict[Any, float]:
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
    parts: tuple[str, ...] = (),
    removed: tuple[int, ...] | list[int] | None = None,
) -> dict[str, Any]:
    """RouterConfig options (layers, init, init_biases, init_scorer, init_removed) that make untrained routers run
    the static plan `scorer` chooses for `target_layers` on `batches` (list of token ids [batch, seq]). layers: the
    routed layers; None: the default ones (all but the first and last) and any other the plan removes. A RouterError
    when the plan removes a layer that given `layers` leave without a router. parts ("attention", "mlp"): the plan
    removes sub-layers of sub-layer routers (`sublayer_plan`; init "static_parts", also init_removed_parts); without
    them a sub-layer router starts as the layer plan, each layer's bias on both of its parts. removed: the plan's layers
    given (a healed start's), the scorer only ranks them for the biases."""
    from depthprune.static.scorers import get_scorer

    if not 0 < low <= high:
        raise RouterError(f"static init needs 0 < low <= high, got low={low}, high={high}")
    facts = model_facts(model)
    n = facts["num_layers"]
    given = layers is not None
    layers = tuple(sorted({int(i) for i in (layers if given else default_layers(n))}))
    check_target(target_layers, n, len(layers))
    n_remove = round(n - float(target_layers)) if removed is None else len(removed)
    if n_remove < 1 and removed is not None:
        raise RouterError("the start model removes no layer: give a model `depthprune prune` made (--remove N)")
    if n_remove < 1:
        raise RouterError(
            f"target depth {target_layers} removes no layer of {n} statically: a static init needs a target at "
            f"most {n - 1} (or use --init uniform)"
        )
    if parts and removed is not None:
        raise RouterError("a healed start gives a layer plan: use init static (not static_parts) with --start")
    if parts:
        return _sublayer_init(model, batches, float(n_remove), layers, given, scorer, low, high, parts)
    stack = "decoder" if facts["granularity"] == "token" else None
    result = get_scorer(scorer)(model, batches, n_remove=n_remove, stack=stack)
    removed = tuple(sorted(result.remove if removed is None else removed))
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


def sublayer_scores(model: nn.Module, batches: list[torch.Tensor]) -> dict[tuple[int, str], float]:
    """Block Influence of every sub-layer (1 - mean cosine similarity of the state entering a layer's attention (MLP)
    and the state leaving it, residual included), over every token of `batches`: the attention-drop criterion of
    "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024), on depthprune.sublayers' split."""
    from depthprune.runner import capture_stack
    from depthprune.sublayers import PARTS

    sums: dict[tuple[int, str], float] = {}
    count = 0
    with torch.no_grad():
        for ids in batches:
            hidden, call = capture_stack(model, {"input_ids": ids, "use_cache": False})
            for layer in range(len(call)):
                for part in PARTS:
                    out = call.run_part(hidden, layer, part)
                    cos = nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
                    sums[(layer, part)] = sums.get((layer, part), 0.0) + float(cos.double().sum())
                    hidden = out
            count += ids.numel()
    return {key: 1.0 - total / count for key, total in sums.items()}


def sublayer_plan(
    scores: dict[tuple[int, str], float], shares: dict[str, float], n_remove: float, routed: tuple[int, ...]
) -> list[tuple[int, str]]:
    """The sub-layers to remove: k of each kind, the lowest-scoring of that kind, with the counts chosen so that the
    removed shares come nearest `n_remove` layers without passing it (the target's depth, or as near above it as the
    shares allow), and among those the smallest total score (scores add: the plan that loses least by them)."""
    ranked = {part: sorted((k for k in scores if k[0] in routed and k[1] == part), key=lambda k: (scores[k], k))
              for part in shares}  # fmt: skip
    best: tuple[float, float, list[tuple[int, str]]] = (0.0, 0.0, [])
    a, b = list(shares)

    def pick(i: int, j: int) -> list[tuple[int, str]]:
        return ranked[a][:i] + ranked[b][:j]

    for i in range(len(ranked[a]) + 1):
        for j in range(len(ranked[b]) + 1):
            removed = i * shares[a] + j * shares[b]
            if removed > n_remove + 1e-9:
                break
            cost = sum(scores[k] for k in pick(i, j))
            if (round(removed, 6), -cost) > (round(best[0], 6), -best[1]):
                best = (removed, cost, pick(i, j))
    return sorted(best[2])


def _sublayer_init(model, batches, n_remove, layers, given, scorer, low, high, parts) -> dict[str, Any]:
    from depthprune.skipping.routers import gate_key
    from depthprune.sublayers import part_shares

    if scorer != "block_influence":
        raise RouterError(f"a sub-layer static init scores sub-layers with block_influence; got scorer {scorer!r}")
    from depthprune.adapters.registry import get_adapter

    adapter = get_adapter(model)
    shares = part_shares(adapter.run_sequence(model, "decoder")[0])
    scores = sublayer_scores(model, batches)
    routed = layers if given else tuple(range(len({k[0] for k in scores})))  # the plan may take the first or last
    removed = sublayer_plan(scores, shares, n_remove, routed)
    if not given:
        layers = tuple(sorted({*layers, *(k[0] for k in removed)}))
    units = [(i, p) for i in layers for p in parts]
    kept = sorted((u for u in units if u not in removed), key=lambda u: (scores[u], u))
    gone = sorted(removed, key=lambda u: (-scores[u], u))
    biases = rank_biases(kept, low, high) if kept else {}
    biases.update({u: -b for u, b in rank_biases(gone, low, high).items()})
    whole = tuple(i for i in layers if all((i, p) in removed for p in parts))
    return {
        "layers": layers,
        "init": "static_parts",
        "init_biases": tuple(biases[u] for u in units),
        "init_scorer": f"{scorer} (sub-layers)",
        "init_removed": whole,
        "init_removed_parts": tuple(gate_key(i, p) for i, p in removed),
    }


def healed_start(model: nn.Module, pruned: nn.Module) -> tuple[nn.Module, tuple[int, ...]]:
    """(student, removed layers) for routers that start from `pruned`, a model `depthprune prune` made from `model`
    (its plan is recorded in its config; healed or not): the student is a copy of `model` whose kept layers, and every
    weight outside the layers (embeddings, final norm, head), are `pruned`'s; the removed layers keep `model`'s
    weights. Neither model is modified. A RouterError when `pruned` is not a layer removal of `model`."""
    import copy

    from depthprune.adapters.registry import get_adapter
    from depthprune.static.apply import source_plan

    plan = source_plan(pruned)
    if plan is None:
        raise RouterError(
            "the start model records no layer plan: give the folder `depthprune prune MODEL --remove N [--heal ...]` "
            "wrote (its config.json has the plan)"
        )
    adapter = get_adapter(model)
    stack = adapter.present_stacks(model)[0]
    sizes = adapter.num_layers(model)
    n = sizes[stack.name]
    try:
        resolved = plan.resolve(sizes)
    except Exception as e:  # noqa: BLE001 - a plan of another model: say so with the plan's own complaint
        raise RouterError(f"the start model's plan {plan} is not a plan of this model's layers ({sizes}): {e}") from e
    kept = list(resolved.stacks[stack.name])
    if type(pruned) is not type(model) or kept != sorted(set(kept)):
        raise RouterError(
            f"the start model must be a {type(model).__name__} whose plan removes layers (kept ones once, in order); "
            f"got a {type(pruned).__name__} running {kept}"
        )
    pruned_layers = adapter.layers(pruned, stack)
    if len(pruned_layers) != len(kept) or pruned.config.hidden_size != model.config.hidden_size:
        raise RouterError(
            f"the start model has {len(pruned_layers)} layers of width {pruned.config.hidden_size}, its plan keeps "
            f"{len(kept)} of this model's width {model.config.hidden_size}: it was not pruned from this model"
        )
    student = copy.deepcopy(model)
    names = {id(m): name for name, m in student.named_modules()}
    prefix = names[id(adapter.layers(student, stack))] + "."
    pruned_prefix = {id(m): name for name, m in pruned.named_modules()}[id(pruned_layers)] + "."
    state = {}
    for key, value in pruned.state_dict().items():
        if key.startswith(pruned_prefix):
            pos, rest = key[len(pruned_prefix) :].split(".", 1)
            key = f"{prefix}{kept[int(pos)]}.{rest}"
        state[key] = value
    missing = student.load_state_dict(state, strict=False)
    removed = tuple(i for i in range(n) if i not in kept)
    stray = [k for k in missing.missing_keys if not any(k.startswith(f"{prefix}{i}.") for i in removed)]
    if stray or missing.unexpected_keys:
        raise RouterError(
            f"the start model's weights do not map onto this model (missing {stray[:3]}, unexpected "
            f"{missing.unexpected_keys[:3]}): it was not pruned from this model"
        )
    return student.eval(), removed


__all__ = ["HIGH", "LOW", "healed_start", "rank_biases", "static_init", "sublayer_plan", "sublayer_scores"]
