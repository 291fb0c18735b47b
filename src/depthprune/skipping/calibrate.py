"""Choose the router threshold by Learn-then-Test (depthprune.ltt), as the exits do.

A layer runs when its router's probability is >= the threshold, so thresholds are tested from 0 (every layer runs:
the untouched model) upwards, fixed-sequence, stopping at the first one whose risk cannot be shown <= delta at level
epsilon; the chosen threshold is the most aggressive certified one. The risk:
- decoders ("tokens"): 1 - token agreement of the routed greedy continuation of a prompt with the untouched model's
  (depthprune.generation.calibrate.token_consistency; Hoeffding's bound, the losses are not 0/1);
- encoders ("accuracy_drop"): the share of samples the untouched model gets right and the routed one gets wrong (exact
  binomial), which bounds the accuracy lost to skipping by delta.
`check_generation` / `check_classifier` measure the same figures on held-out data, to print beside the guarantee.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune.errors import RouterError
from depthprune.generation.calibrate import greedy_continuations, token_consistency
from depthprune.ltt import ltt_select
from depthprune.skipping.inference import RoutedClassifier, skip_generate
from depthprune.skipping.routers import check_threshold

GRID = tuple([i / 20 for i in range(20)] + [0.99])


@dataclasses.dataclass
class RouterCalibration:
    """The chosen threshold (None: even the most conservative candidate failed) and one table row per tested
    threshold (threshold, risk, p_value, rejected, mean_layers)."""

    risk: str  # "tokens" (decoders) or "accuracy_drop" (encoders)
    threshold: float | None
    delta: float
    epsilon: float
    n: int
    table: list[dict[str, Any]]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def guarantee(self) -> str:
        what = (
            f"the expected token agreement of a routed greedy continuation with the untouched model's is >= "
            f"{1 - self.delta:g}"
            if self.risk == "tokens"
            else f"the accuracy drop against the untouched model is <= {self.delta:g}"
        )
        if self.threshold is None:
            return (
                f"routers: no threshold certified: even the most conservative candidate could not be shown to keep "
                f"{what.split(' is ')[0]} within {self.delta:g} at confidence {1 - self.epsilon:g} on {self.n} "
                "calibration samples; use more samples or a larger delta"
            )
        row = next(r for r in self.table if r["threshold"] == self.threshold)
        return (
            f"routers at threshold {self.threshold:g} (mean {row['mean_layers']:.2f} layers): with probability >= "
            f"{1 - self.epsilon:g} over the calibration draw ({self.n} samples), on new inputs from the same "
            f"distribution {what} (Learn-then-Test, fixed-sequence testing)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}


def _grid(grid: Sequence[float] | None) -> list[float]:
    return [check_threshold(t) for t in (GRID if grid is None else grid)]


@torch.no_grad()
def routed_continuations(
    model: nn.Module,
    routers: Any,
    prompts: torch.Tensor,
    threshold: float,
    max_new_tokens: int,
    *,
    kv: str = "propagate",
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
) -> tuple[list[list[int]], float]:
    """(continuations of prompts [n, prompt_len] up to the first end of sequence, mean layers per generated token
    after the first)."""
    from depthprune.decoding import special_tokens

    eos, pad = special_tokens(model, eos_token_id if eos_token_id is None or isinstance(eos_token_id, int)
                              else list(eos_token_id), None)  # fmt: skip
    device = next(model.parameters()).device
    tokens: list[list[int]] = []
    layers, count = 0, 0
    for ids in prompts.split(batch_size):
        out = skip_generate(
            model, routers, ids.to(device), threshold=threshold, max_new_tokens=max_new_tokens, kv=kv,
            eos_token_id=tuple(eos), pad_token_id=pad,
        )  # fmt: skip
        ex = out.executed[:, 1:]
        layers, count = layers + float(ex[ex > 0].sum()), count + int((ex > 0).sum())
        for row, done in zip(out.sequences[:, ids.shape[1] :].tolist(), out.executed.tolist(), strict=True):
            tokens.append([t for t, e in zip(row, done, strict=True) if e > 0])
    return tokens, layers / count if count else float(routers.num_layers)


def calibrate_generation_routers(
    model: nn.Module,
    routers: Any,
    prompts: torch.Tensor,
    *,
    delta: float = 0.2,
    epsilon: float = 0.05,
    max_new_tokens: int = 32,
    kv: str = "propagate",
    grid: Sequence[float] | None = None,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    references: list[list[int]] | None = None,
) -> RouterCalibration:
    """The most aggressive threshold certified to keep the expected token agreement with the untouched model's greedy
    continuations >= 1 - delta, with probability >= 1 - epsilon over the draw of `prompts` [n, prompt_len]."""
    thresholds = _grid(grid)
    if references is None:
        references = greedy_continuations(
            model, prompts, max_new_tokens, batch_size=batch_size, eos_token_id=eos_token_id
        )
    runs: dict[float, tuple[torch.Tensor, float]] = {}

    def run(t: float) -> tuple[torch.Tensor, float]:
        if t not in runs:
            got, depth = routed_continuations(
                model, routers, prompts, t, max_new_tokens, kv=kv, batch_size=batch_size, eos_token_id=eos_token_id
            )
            scores = [token_consistency(c, r) for c, r in zip(got, references, strict=True)]
            runs[t] = (1.0 - torch.tensor(scores, dtype=torch.float64), depth)
        return runs[t]

    chosen, table = ltt_select(thresholds, lambda t: run(t)[0], delta, epsilon, lambda t: {"mean_layers": run(t)[1]})
    settings = {"kv": kv, "max_new_tokens": max_new_tokens, "num_layers": routers.num_layers}
    return RouterCalibration("tokens", chosen, delta, epsilon, len(prompts), table, settings)


def check_generation(
    model: nn.Module,
    routers: Any,
    prompts: torch.Tensor,
    threshold: float,
    *,
    max_new_tokens: int = 32,
    kv: str = "propagate",
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    references: list[list[int]] | None = None,
) -> dict[str, float]:
    """Held-out token agreement with the untouched model's greedy continuations, and mean layers per token."""
    if references is None:
        references = greedy_continuations(
            model, prompts, max_new_tokens, batch_size=batch_size, eos_token_id=eos_token_id
        )
    got, depth = routed_continuations(
        model, routers, prompts, threshold, max_new_tokens, kv=kv, batch_size=batch_size, eos_token_id=eos_token_id
    )
    scores = [token_consistency(c, r) for c, r in zip(got, references, strict=True)]
    return {"tokens": sum(scores) / len(scores), "mean_layers": depth, "n": len(scores), "threshold": threshold}


@torch.no_grad()
def _classify(model, routers, ids, mask, threshold, batch_size):
    device = next(model.parameters()).device
    preds, layers = [], []
    clf = RoutedClassifier(model, routers, threshold)
    for i in range(0, len(ids), batch_size):
        out = clf(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
        preds.append(out.predictions.cpu())
        layers.append(out.executed.cpu())
    return torch.cat(preds), torch.cat(layers).float()


def calibrate_classifier_routers(
    model: nn.Module,
    routers: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    delta: float = 0.02,
    epsilon: float = 0.05,
    grid: Sequence[float] | None = None,
    batch_size: int = 32,
) -> RouterCalibration:
    """The most aggressive threshold certified to keep the accuracy drop <= delta with probability >= 1 - epsilon."""
    if not len(input_ids) == len(attention_mask) == len(labels) or not len(labels):
        raise RouterError("give as many (at least one) input rows, masks and labels")
    thresholds = _grid(grid)
    full, _ = _classify(model, routers, input_ids, attention_mask, 0.0, batch_size)
    right = full == labels.cpu()
    runs: dict[float, tuple[torch.Tensor, float]] = {}

    def run(t: float) -> tuple[torch.Tensor, float]:
        if t not in runs:
            pred, layers = _classify(model, routers, input_ids, attention_mask, t, batch_size)
            runs[t] = ((right & (pred != labels.cpu())).double(), float(layers.mean()))
        return runs[t]

    chosen, table = ltt_select(thresholds, lambda t: run(t)[0], delta, epsilon, lambda t: {"mean_layers": run(t)[1]})
    return RouterCalibration("accuracy_drop", chosen, delta, epsilon, len(labels), table, {})


def check_classifier(
    model: nn.Module,
    routers: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """Held-out accuracy of the untouched and the routed model, the drop, and mean layers."""
    full, _ = _classify(model, routers, input_ids, attention_mask, 0.0, batch_size)
    pred, layers = _classify(model, routers, input_ids, attention_mask, threshold, batch_size)
    labels = labels.cpu()
    return {
        "full_accuracy": float((full == labels).float().mean()),
        "accuracy": float((pred == labels).float().mean()),
        "accuracy_drop": float(((full == labels) & (pred != labels)).float().mean()),
        "mean_layers": float(layers.mean()),
        "n": len(labels),
        "threshold": threshold,
    }


__all__ = [
    "GRID",
    "RouterCalibration",
    "calibrate_classifier_routers",
    "calibrate_generation_routers",
    "check_classifier",
    "check_generation",
    "routed_continuations",
]
