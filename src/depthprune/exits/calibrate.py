"""Choose an exit threshold with a statistical guarantee (Learn-then-Test, as CALM and CAT describe).

Goal: agreement with the full model >= 1 - delta, with probability >= 1 - epsilon over the draw of the calibration set.

For each candidate threshold t, the null hypothesis H_t says "the disagreement rate of t exceeds delta". Its exact
binomial p-value on n calibration samples with k disagreements is P[Binomial(n, delta) <= k]. The candidates are
tested in a fixed order, from the most conservative to the most aggressive, and testing stops at the first one
that is not rejected at level epsilon (fixed-sequence testing controls the family-wise error at epsilon with no
correction). The chosen threshold is the most aggressive rejected one: every rejected threshold has risk <= delta
simultaneously with probability >= 1 - epsilon.

Two risks can be controlled for classifiers (`risk=`):

- "disagreement" (default): the share of samples whose early-exit prediction differs from the full model's.
- "accuracy_drop": the share of samples the full model gets right and the early-exit prediction gets wrong. The
  accuracy lost to early exit is at most this share (exits can also fix some of the full model's mistakes), so
  controlling it bounds the accuracy drop by delta. Needs labels on the calibration split. It is the weaker, and often
  the more useful, guarantee: disagreements on samples the full model already gets wrong cost no accuracy.

The same machinery serves any per-sample loss in [0, 1] (token agreement, ROUGE-L, ...) through `ltt_select`; for
losses that are not 0/1 the p-value uses Hoeffding's bound instead of the exact binomial tail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune.exits.criteria import Criterion, ExitState, criterion_class
from depthprune.exits.heads import ExitHeads
from depthprune.ltt import ltt_select

RISKS = ("disagreement", "accuracy_drop")


@dataclasses.dataclass
class Calibration:
    """Result of calibrating one criterion: the chosen threshold (None if even the most conservative fails)."""

    criterion: str
    threshold: float | None
    delta: float
    epsilon: float
    n: int
    table: list[dict[str, Any]]  # one row per tested threshold: threshold, risk, p_value, rejected, mean_layers
    risk: str = "disagreement"

    def guarantee(self) -> str:
        what = "disagreement" if self.risk == "disagreement" else "the accuracy drop"
        if self.threshold is None:
            return (
                f"{self.criterion}: no threshold certified: even the most conservative candidate could not be shown to "
                f"keep {what} <= {self.delta} at confidence {1 - self.epsilon} on {self.n} calibration samples; "
                "use more calibration data or a larger delta"
            )
        if self.risk == "disagreement":
            claim = f"agreement with the full model on new data from the same distribution is >= {1 - self.delta:g}"
        else:
            claim = (
                "on new data from the same distribution, the share of samples the full model gets right and early "
                f"exit gets wrong is <= {self.delta:g}, so accuracy drops by at most {100 * self.delta:g} points"
            )
        return (
            f"{self.criterion}:{self.threshold:g} -- with probability >= {1 - self.epsilon:g} over the calibration "
            f"draw ({self.n} samples), {claim} (Learn-then-Test, fixed-sequence testing, exact binomial p-values)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}


# ---- exit records: everything needed to replay any criterion offline --------------------------------------------
@dataclasses.dataclass
class ExitRecords:
    """All exits' outputs on a dataset, so any criterion at any threshold can be replayed without the model.

    logits [exits, n, labels]; halting / gate / agreement [exits, n] or None; final [n, labels]; labels [n] or None.
    exit_layers: the layer each exit reads; num_layers: depth of the stack.
    """

    logits: torch.Tensor
    final: torch.Tensor
    exit_layers: tuple[int, ...]
    num_layers: int
    halting: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    agreement: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def subset(self, rows: torch.Tensor) -> ExitRecords:
        pick = lambda t, dim: None if t is None else t.index_select(dim, rows)  # noqa: E731
        return ExitRecords(
            pick(self.logits, 1),
            pick(self.final, 0),
            self.exit_layers,
            self.num_layers,
            pick(self.halting, 1),
            pick(self.gate, 1),
            pick(self.agreement, 1),
            pick(self.labels, 0),
        )

    @property
    def n(self) -> int:
        return self.final.shape[0]


@torch.no_grad()
def collect_records(
    model: nn.Module, heads: ExitHeads, batches: Sequence[dict[str, torch.Tensor]], *, progress: bool = False
) -> ExitRecords:
    """Run every layer and exit on `batches` (dicts with input_ids, attention_mask and optionally labels)."""
    from depthprune.exits.inference import all_exit_outputs

    model.eval()
    heads.eval()
    parts: dict[str, list[torch.Tensor]] = {
        "logits": [],
        "final": [],
        "halting": [],
        "gate": [],
        "agreement": [],
        "labels": [],
    }
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="exit records", unit="batch")
    for batch in it:
        out = all_exit_outputs(model, heads, batch["input_ids"], batch.get("attention_mask"))
        parts["logits"].append(torch.stack([e.logits.float() for e in out.exits]))  # [exits, b, labels]
        parts["final"].append(out.final.float())
        for extra in ("halting", "gate", "agreement"):
            if getattr(out.exits[0], extra) is not None:
                parts[extra].append(torch.stack([getattr(e, extra).float() for e in out.exits]))
        if "labels" in batch:
            parts["labels"].append(batch["labels"])
    cat = lambda key, dim: torch.cat(parts[key], dim) if parts[key] else None  # noqa: E731
    return ExitRecords(
        cat("logits", 1),
        cat("final", 0),
        heads.config.layers,
        heads.config.num_layers,
        cat("halting", 1),
        cat("gate", 1),
        cat("agreement", 1),
        cat("labels", 0),
    )


def simulate(criterion: Criterion, records: ExitRecords) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay `criterion` on recorded exits: (predicted labels [n], exit layer [n], 0-based).

    Uses the criterion's own `decide` (and `predict`), so the offline replay matches online inference."""
    n = records.n
    pred = records.final.argmax(-1).clone()
    exit_layer = torch.full((n,), records.num_layers - 1, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    history, halting = [], []
    predict = getattr(criterion, "predict", None)
    for j, layer in enumerate(records.exit_layers):
        logits = records.logits[j]
        history.append(logits)
        if records.halting is not None:
            halting.append(records.halting[j])
        state = ExitState(
            layer,
            records.num_layers,
            logits,
            history,
            halting,
            None if records.gate is None else records.gate[j],
            None if records.agreement is None else records.agreement[j],
        )
        done = criterion.decide(state) & undecided
        if done.any():
            chosen = (predict(state) if predict is not None else logits).argmax(-1)
            pred[done] = chosen[done]
            exit_layer[done] = layer
            undecided &= ~done
    return pred, exit_layer


def calibrate(
    criterion: str,
    records: ExitRecords,
    *,
    delta: float = 0.01,
    epsilon: float = 0.05,
    grid: Sequence[float] | None = None,
    risk: str = "disagreement",
) -> Calibration:
    """Pick the most aggressive threshold of `criterion` certified to keep the risk (disagreement with the full
    model, or the accuracy drop: see the module docstring) <= delta with probability >= 1 - epsilon."""
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; choose one of {', '.join(RISKS)}")
    if risk == "accuracy_drop" and records.labels is None:
        raise ValueError(
            "risk='accuracy_drop' needs labels on the calibration split; give a label column, or use "
            "risk='disagreement', which needs none"
        )
    cls = criterion_class(criterion)
    thresholds = list(grid) if grid is not None else cls.grid()
    reference = records.final.argmax(-1)
    full_right = None if records.labels is None else reference == records.labels

    def run(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        return simulate(cls(t), records)

    def losses_of(t: float) -> torch.Tensor:
        pred, _ = run(t)
        if risk == "accuracy_drop":
            return (full_right & (pred != records.labels)).float()
        return (pred != reference).float()

    def extra_of(t: float) -> dict[str, Any]:
        _, layers = run(t)
        return {"mean_layers": float((layers + 1).float().mean())}

    chosen, table = ltt_select(thresholds, losses_of, delta, epsilon, extra_of)
    return Calibration(criterion, chosen, delta, epsilon, records.n, table, risk)


def check(criterion: Criterion, records: ExitRecords) -> dict[str, float]:
    """Held-out figures of a criterion: agreement with the full model, accuracy (if labels), mean layers used."""
    pred, layers = simulate(criterion, records)
    out = {
        "agreement": float((pred == records.final.argmax(-1)).float().mean()),
        "mean_layers": float((layers + 1).float().mean()),
        "n": records.n,
    }
    if records.labels is not None:
        out["accuracy"] = float((pred == records.labels).float().mean())
        out["full_accuracy"] = float((records.final.argmax(-1) == records.labels).float().mean())
    return out
