"""Layer merging, LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse"), as the paper
writes it.

Reserving-differences-while-seeking-common (RDSC): merging layers l..l+m into one layer gives it, for every
parameter of the layer (attention, MLP and norm weights and biases alike),

    theta* = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l),

and the merged layer runs at position l; layers l+1..l+m are gone. (LaCo's public notebooks add the differences only
for some projections and keep the rest of the base layer, which users reported in the repository's issues #4/#5;
here every parameter follows the formula, computed in float64.) Buffers (rotary tables, masks) are the base layer's.
Two layers merge into the second one's weights (theta_l + (theta_{l+1} - theta_l) = theta_{l+1}), so C = 2 is the
removal of the base layer; from three on the merge extrapolates (theta_{l+1} + theta_{l+2} - theta_l), which only
stays close to the layers where their differences are small (the paper's Llama-2 layers; not SmolLM2-135M's, see
benchmarks/RESULTS.md 6.4).

Which runs to merge is chosen on calibration text by the paper's algorithm (`laco`): start at l = H - C, merge the C
layers l..l+C-1 (fewer where the top of the range or the target is reached), and compare the merged model's final
hidden states (after the final norm: what the head reads) with the untouched model's by their mean cosine similarity
over calibration tokens. Above the threshold T the merge is kept and the next candidate starts I positions lower
(so a later merge may take in an earlier merged layer, as in the paper); below it, one position lower. The search
stops when the target number of layers is removed or l falls below L. The paper's defaults for Llama2-7B (32 layers)
are C = 4, [L, H) = [16, 32), I = 2; here L = half the depth, H = the depth, C = 4, I = 2 for any depth, and
T = 0.85 for the cosine of final hidden states (ours: the paper compares sentence representations). On SmolLM2-135M
no 3- or 4-layer merge comes near it and searches need C = 2 and T ~ 0.5 (benchmarks/RESULTS.md 6.4).

The result is an ordinary model of the same class with fewer layers: `apply_plan` rebuilds the structure (layer
index attributes renumbered, config depth and `layer_types` fields updated, the kept source layers recorded as the
plan) and the merged weights are then written into the merged positions; `config.depthprune_fusion` records every
merge (runs in the positions of the model it was applied to) and which source layers each merged position holds.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune.plan import LayerPlan
from depthprune.runner import capture_stack
from depthprune.static.apply import apply_plan, clone_model
from depthprune.static.fusion.runs import (
    RECORD_KEY,
    Run,
    Target,
    check_runs,
    fusion_record,
    resolve_stack,
    source_layers,
)
from depthprune.static.scorers.hidden import as_batches, eval_mode, model_inputs

NAME = "laco"


def merged_parameters(layers: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """RDSC: {name: theta_l + sum_k (theta_{l+k} - theta_l)} over every parameter of `layers[0]` (float64 sums, cast
    back to each parameter's dtype). One layer gives its own parameters."""
    base = dict(layers[0].named_parameters())
    others = [dict(layer.named_parameters()) for layer in layers[1:]]
    out = {}
    with torch.no_grad():
        for name, p in base.items():
            theta = p.detach().double()
            total = theta.clone()
            for other in others:
                total += other[name].detach().double() - theta
            out[name] = total.to(p.dtype)
    return out


def _merge(model: nn.Module, target: Target, runs: list[Run], *, share_weights: bool, method: str) -> nn.Module:
    """The merged model for checked, sorted runs. share_weights: the result shares every tensor it does not change
    with `model` (cheap candidates while searching; the merged positions get new tensors, so `model` is unchanged)."""
    merged = {a: merged_parameters(target.layers[a : b + 1]) for a, b in runs if b > a}
    gone = {i for a, b in runs for i in range(a + 1, b + 1)}
    sizes = target.adapter.num_layers(model)
    keep = [i for i in range(len(target)) if i not in gone]
    new = apply_plan(model, LayerPlan({target.name: tuple(keep)}).resolve(sizes), share_weights=share_weights)
    layers = target.adapter.layers(new, target.spec)
    for a, values in merged.items():
        layer = layers[keep.index(a)]
        for name, value in values.items():
            owner, _, leaf = name.rpartition(".")
            module = layer.get_submodule(owner) if owner else layer
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)

    sources = source_layers(model, target)
    record = fusion_record(model)
    covers: dict[str, list[int]] = {}
    new_pos = 0
    for pos in range(len(target)):
        if pos in gone:
            continue
        run = next(((a, b) for a, b in runs if a == pos), None)
        held = sorted({s for i in range(run[0], run[1] + 1) for s in sources[i]}) if run else sources[pos]
        if len(held) > 1:
            covers[str(new_pos)] = held
        new_pos += 1
    record["steps"].append({"method": method, "stack": target.name, "runs": [list(r) for r in runs]})
    record["merged_layers"] = {**record["merged_layers"], target.name: covers}
    setattr(new.config, RECORD_KEY, record)
    return new


def merge_layers(model: nn.Module, runs: Sequence[Sequence[int]] | str, *, stack: str | None = None) -> nn.Module:
    """A new model in which each run (first, last) of positions, both included, is one RDSC-merged layer at `first`:
    e.g. runs=[(10, 13)] turns layers 10-13 into one. `model` is never modified."""
    target = resolve_stack(model, stack, "merge")
    runs = check_runs(model, target, runs, "merge")
    return _merge(model, target, runs, share_weights=False, method="merge")


@dataclasses.dataclass
class Candidate:
    """One merge the search tried: positions first..last of the model at that step, and its similarity."""

    first: int
    last: int
    similarity: float
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MergeResult:
    """What `laco` chose: the accepted runs in order (each in the positions of the model it was applied to), every
    candidate tried with its similarity, the merged model, and how many layers it removed (of `n_remove` asked)."""

    model: nn.Module
    runs: list[Run]
    candidates: list[Candidate]
    n_removed: int
    n_remove: int
    stack: str
    options: dict[str, Any]

    @property
    def reached(self) -> bool:
        return self.n_removed == self.n_remove

    @property
    def similarities(self) -> list[float]:
        """The similarity of each accepted run, in order."""
        return [c.similarity for c in self.candidates if c.accepted]

    @property
    def merged_layers(self) -> dict[str, list[int]]:
        """Position in the merged model -> the source layers merged into it."""
        return fusion_record(self.model)["merged_layers"].get(self.stack, {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": NAME,
            "stack": self.stack,
            "runs": [list(r) for r in self.runs],
            "similarities": self.similarities,
            "merged_layers": self.merged_layers,
            "n_removed": self.n_removed,
            "n_remove": self.n_remove,
            "reached": self.reached,
            "options": self.options,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _final(target: Target, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    norm = target.adapter.final_norm(model, target.name)
    return norm(hidden) if norm is not None else hidden


def laco(
    model: nn.Module,
    batches: Sequence[torch.Tensor] | torch.Tensor,
    n_remove: int,
    *,
    merge_count: int = 4,
    low: int | None = None,
    high: int | None = None,
    threshold: float = 0.85,
    interval: int = 2,
    stack: str | None = None,
    progress: bool = False,
) -> MergeResult:
    """LaCo's search: remove `n_remove` layers by RDSC merges of `merge_count` (C) layers within positions [low, high)
    ([L, H); default [depth // 2, depth)), each kept when the mean cosine similarity of the merged model's final
    hidden states to the untouched model's on `batches` exceeds `threshold` (T), the next candidate `interval` (I)
    positions lower after a kept merge, one lower after a rejected one. `model` is never modified.

    Stops short of `n_remove` (with a warning; `MergeResult.reached` is False) when l falls below `low` first; raises
    when no candidate passes at all (nothing to return but the model itself)."""
    target = resolve_stack(model, stack, NAME)
    n = len(target)
    batches = as_batches(batches, NAME)
    low = n // 2 if low is None else low
    high = n if high is None else high
    for label, value, lo in (("n_remove", n_remove, 1), ("merge_count", merge_count, 2), ("interval", interval, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{NAME}: {label} must be an integer >= {lo}, got {value!r}")
    if n_remove >= n:
        raise ValueError(f"{NAME}: n_remove must be below the {n} layers of stack {target.name!r}, got {n_remove}")
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low < high <= n):
        raise ValueError(
            f"{NAME}: the layer range [low, high) must satisfy 0 <= low < high <= {n}, got [{low}, {high})"
        )
    if high - low - 1 < n_remove:
        raise ValueError(
            f"{NAME}: merges within [{low}, {high}) can remove at most {high - low - 1} layers, fewer than "
            f"n_remove={n_remove}; widen the range (low, high)"
        )
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"{NAME}: threshold is a cosine similarity in [-1, 1], got {threshold!r}")
    options = {"merge_count": merge_count, "low": low, "high": high, "threshold": threshold, "interval": interval}

    with eval_mode(model), torch.no_grad():
        # The untouched model's final states, and its states entering layer `low`: merges never touch the layers
        # below `low`, so every candidate resumes from there.
        starts, references = [], []
        for ids in batches:
            hidden, call = capture_stack(model, model_inputs(model, ids), stack=target.name)
            h = call.run(hidden, 0, low)  # [b, s, hidden]
            starts.append(h)
            references.append(_final(target, model, call.run(h, low)))

        def similarity(candidate: nn.Module) -> float:
            total, count = 0.0, 0
            for ids, h, ref in zip(batches, starts, references, strict=True):
                _, call = capture_stack(candidate, model_inputs(candidate, ids), stack=target.name)
                out = _final(target, candidate, call.run(h, low))
                total += float(nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1).double().sum())
                count += ref.shape[0] * ref.shape[1]
            return total / count

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_remove, desc=NAME, unit="layer")
        current, current_target = model, target
        runs: list[Run] = []
        candidates: list[Candidate] = []
        removed = 0
        pos = max(high - merge_count, low)  # the top C layers of the range (all of it, if it is narrower)
        while pos >= low and removed < n_remove:
            top = high - removed  # the range's end in the current model
            last = min(pos + merge_count - 1, top - 1, pos + n_remove - removed)
            if last <= pos:
                pos -= 1
                continue
            candidate = _merge(current, current_target, [(pos, last)], share_weights=True, method=NAME)
            with eval_mode(candidate):
                sim = similarity(candidate)
            accepted = sim > threshold
            candidates.append(Candidate(pos, last, sim, accepted))
            if bar is not None:
                bar.set_postfix_str(f"{pos}-{last}: {sim:.4f}{' kept' if accepted else ''}")
            if accepted:
                current = candidate
                current_target = resolve_stack(current, target.name, NAME)
                runs.append((pos, last))
                removed += last - pos
                if bar is not None:
                    bar.update(last - pos)
                pos -= interval
            else:
                pos -= 1
        if bar is not None:
            bar.close()
    if not runs:
        best = max(candidates, key=lambda c: c.similarity, default=None)
        seen = f"; the best candidate, {best.first}-{best.last}, reached {best.similarity:.4f}" if best else ""
        raise ValueError(
            f"{NAME}: no merge of {merge_count} layers within [{low}, {high}) kept a similarity above threshold "
            f"{threshold}{seen}; lower the threshold, widen the range or merge fewer layers at a time"
        )
    if removed < n_remove:
        warnings.warn(
            f"{NAME}: removed {removed} of the {n_remove} layers asked: no further merge within [{low}, {high}) kept "
            f"a similarity above {threshold}; lower the threshold or widen the range to remove more",
            stacklevel=2,
        )
    # The accepted candidate shares its unchanged tensors with `model`: hand back a model of its own.
    final = clone_model(current)
    for step in getattr(final.config, RECORD_KEY)["steps"][-len(runs) :]:
        step["options"] = options
    return MergeResult(final, runs, candidates, removed, n_remove, target.name, options)


__all__ = ["Candidate", "MergeResult", "laco", "merge_layers", "merged_parameters"]
