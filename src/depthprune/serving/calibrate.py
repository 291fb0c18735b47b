"""Choose the split K and the edge's exit threshold with a guarantee (Learn-then-Test on collaborative continuations).

For each candidate split K (default: one after each exit layer), the edge uses the exits below K; the thresholds of
the criterion's grid are tested from the most conservative on with fixed-sequence Learn-then-Test
(`depthprune.ltt.ltt_select`) on the continuations the real system produces: the `EdgeClient` of `serving.edge`
driving the cloud's `ContextManager` in this process (`LocalTransport`), the states going through the chosen codec's
frames, exactly as over HTTP. The loss of a prompt is 1 - consistency with the full model's greedy continuation:

- "identical" (default): 0 if the continuation is the full model's, else 1: exact binomial p-values, and since token
  agreement >= [identical], the guarantee bounds the expected token agreement too;
- "tokens" / "rouge_l": the share of equal positions / ROUGE-L F1 (`generation.calibrate`; Hoeffding's bound, which
  needs many more prompts for a small delta).

Each candidate K is tested at level epsilon / (number of candidates) (Bonferroni), so the guarantee holds for the K
chosen after looking at the results: among the certified candidates, the one with the smallest measured cloud
compute per generated token (layer-positions of layers [K, n) plus one LM head per cloud-decided token, in decoder-
layer equivalents), the smaller K on ties (less work on the edge). `max_edge_layers` caps K (the edge device's budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune import decoding
from depthprune.exits.lm_heads import ExitHeadsLike
from depthprune.exits.token_criteria import TokenCriterion, criterion_class
from depthprune.generation.calibrate import greedy_continuations, rouge_l, token_consistency
from depthprune.ltt import ltt_select
from depthprune.serving.context import ContextManager
from depthprune.serving.edge import EdgeClient, LocalTransport
from depthprune.serving.split import SplitError, check_split
from depthprune.serving.transfer import STATE_CODECS

CONSISTENCY = ("identical", "tokens", "rouge_l")


def identical(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """1.0 if the two continuations are the same, else 0.0."""
    return float(list(candidate) == list(reference))


def _measure(name: str):
    measures = {"identical": identical, "tokens": token_consistency, "rouge_l": rouge_l}
    if name not in measures:
        raise ValueError(f"unknown consistency measure {name!r}; choose one of {', '.join(CONSISTENCY)}")
    return measures[name]


@dataclasses.dataclass(frozen=True)
class ExitView:
    """The exits of `heads` below `split`: what an edge that runs layers [0, split) can use."""

    heads: ExitHeadsLike
    split: int

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(e for e in self.heads.layers if e < self.split)

    @property
    def num_layers(self) -> int:
        return self.heads.num_layers

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads.logits(layer, hidden)

    def confidence(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.heads.confidence(layer, hidden)


def head_cost(model: nn.Module) -> float:
    """The model's final step (norm + LM head) in decoder-layer equivalents: its weights over a layer's (mean)."""
    _, layers, _ = decoding.decoder_parts(model, "cloud-edge split inference")
    head = model.get_output_embeddings()
    per_layer = sum(p.numel() for layer in layers for p in layer.parameters()) / len(layers)
    return float(head.weight.numel() / per_layer)


@dataclasses.dataclass
class SplitCalibration:
    """The result: the chosen split and threshold (None when no candidate is certified), the guarantee's terms and
    one entry per candidate split (its Learn-then-Test table: threshold, risk, p_value, rejected, agreement,
    identical, edge_share, cloud_compute (layer-equivalents per generated token) and the same as a share of cloud-only
    serving's, edge_layers)."""

    split: int | None
    criterion: str
    threshold: float | None
    delta: float
    epsilon: float
    n: int
    consistency: str
    codec: str
    max_new_tokens: int
    num_layers: int
    candidates: list[dict[str, Any]]

    def guarantee(self) -> str:
        measure = {
            "identical": "share of continuations identical to the full model's greedy continuation (and so the "
            "expected token agreement)",
            "tokens": "token agreement with the full model's greedy continuation",
            "rouge_l": "ROUGE-L F1 with the full model's greedy continuation",
        }[self.consistency]
        setting = f"{self.codec} transfer, {self.max_new_tokens} new tokens, {len(self.candidates)} candidate split(s)"
        if self.split is None:
            return (
                f"no split certified: at no candidate split could even the most conservative {self.criterion} "
                f"threshold be shown to keep the expected {measure} >= {1 - self.delta:g} at confidence "
                f"{1 - self.epsilon:g} on {self.n} calibration prompts ({setting}); use more prompts or a larger delta"
            )
        return (
            f"split {self.split}, {self.criterion}:{self.threshold:g} -- with probability >= {1 - self.epsilon:g} over "
            f"the calibration draw ({self.n} prompts), the expected {measure}, on new prompts from the same "
            f"distribution, is >= {1 - self.delta:g} ({setting}; Learn-then-Test, fixed-sequence testing per split at "
            f"epsilon / {len(self.candidates)}, exact binomial p-values for 0/1 losses, Hoeffding otherwise)"
        )

    def chosen(self) -> dict[str, Any] | None:
        """The chosen threshold's table row at the chosen split."""
        for cand in self.candidates:
            if cand["split"] == self.split:
                return next(r for r in cand["table"] if r["threshold"] == cand["threshold"])
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitCalibration:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@torch.no_grad()
def collaborative_run(
    model: nn.Module,
    split: int,
    heads: ExitHeadsLike,
    criterion: TokenCriterion,
    prompts: torch.Tensor,
    references: list[list[int]],
    measure=identical,
    *,
    max_new_tokens: int | None = None,
    codec: str = "fp16",
    eos_token_id: list[int] | None = None,
) -> dict[str, Any]:
    """Collaborative continuations of `prompts` [n, prompt_len] (max_new_tokens: default the longest reference's) by
    the real edge and cloud code in this process, and their figures against `references`: losses [n] (1 - measure),
    agreement (mean token consistency), identical (share of identical continuations), edge_share, cloud_compute
    (layer-equivalents per generated token)."""
    new = max_new_tokens or max(len(r) for r in references)
    max_seq = prompts.shape[1] + new + 2
    manager = ContextManager(model, split, max_seq=max_seq)
    client = EdgeClient(
        model, split, heads, criterion, transport=LocalTransport(manager), codec=codec, async_upload=False
    )
    outs = [client.generate(ids, new, eos_token_id=eos_token_id or []) for ids in prompts]
    client.close()
    pairs = list(zip((o.tokens for o in outs), references, strict=True))
    got = sum(len(o.tokens) for o in outs)
    compute = manager.stats.layer_tokens + manager.stats.computed_requests * head_cost(model)
    return {
        "losses": torch.tensor([1.0 - measure(c, r) for c, r in pairs], dtype=torch.float64),
        "agreement": sum(token_consistency(c, r) for c, r in pairs) / len(pairs),
        "identical": sum(c == r for c, r in pairs) / len(pairs),
        "edge_share": sum(s != "cloud" for o in outs for s in o.sources) / max(1, got),
        "cloud_compute": compute / max(1, got),
    }


def default_splits(heads: ExitHeadsLike) -> list[int]:
    """One candidate per exit: the edge ends right after it (K = exit + 1)."""
    return sorted({int(e) + 1 for e in heads.layers})


@torch.no_grad()
def calibrate_split(
    model: nn.Module,
    heads: ExitHeadsLike,
    prompts: torch.Tensor,
    *,
    splits: Sequence[int] | None = None,
    criterion: str = "max_prob",
    grid: Sequence[float] | None = None,
    delta: float = 0.05,
    epsilon: float = 0.05,
    consistency: str = "identical",
    max_new_tokens: int = 16,
    codec: str = "fp16",
    max_edge_layers: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    references: list[list[int]] | None = None,
    progress: bool = False,
) -> SplitCalibration:
    """Choose K and the threshold of `criterion` (see the module doc) on `prompts` [n, prompt_len]; the full model's
    greedy continuations are generated once (or given as `references`, same eos and max_new_tokens)."""
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise ValueError(f"delta and epsilon must lie in (0, 1); got delta={delta}, epsilon={epsilon}")
    if codec not in STATE_CODECS:
        raise ValueError(f"codec must be one of {STATE_CODECS}, got {codec!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompts.dim() != 2 or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty [n, prompt_len] tensor, got shape {tuple(prompts.shape)}")
    measure = _measure(consistency)
    cls = criterion_class(criterion)
    n_layers = check_split(model, 1)
    if heads.num_layers != n_layers:
        raise SplitError(f"the exit heads were built for {heads.num_layers} layers, the model has {n_layers}")
    candidates = sorted(set(splits)) if splits else default_splits(heads)
    if max_edge_layers is not None:
        candidates = [k for k in candidates if k <= max_edge_layers]
    if not candidates:
        raise SplitError(f"no candidate split at or below max_edge_layers={max_edge_layers}; allow a deeper edge")
    for k in candidates:
        check_split(model, k)
        if not ExitView(heads, k).layers:
            raise SplitError(f"split {k} leaves the edge no exit (exits after layers {list(heads.layers)})")
    thresholds = list(grid) if grid is not None else cls.grid()
    eos_arg = eos_token_id if eos_token_id is None or isinstance(eos_token_id, int) else list(eos_token_id)
    eos, _ = decoding.special_tokens(model, eos_arg, None)
    eos = list(eos)
    if references is None:
        references = greedy_continuations(model, prompts, max_new_tokens, eos_token_id=eos)
    if len(references) != len(prompts):
        raise ValueError(f"{len(references)} reference continuations for {len(prompts)} prompts")
    cost = head_cost(model)
    # cloud-only serving of the same continuations: every fed position through all n layers, one head per token
    only = sum((prompts.shape[1] + len(r) - 1) * n_layers + len(r) * cost for r in references)
    n_tokens = sum(len(r) for r in references)
    level = epsilon / len(candidates)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="calibrate split", unit="run")
    results = []
    try:
        for k in candidates:
            view = ExitView(heads, k)
            runs: dict[float, dict[str, Any]] = {}

            def run(t: float, k: int = k, view: ExitView = view, runs: dict = runs) -> dict[str, Any]:
                if t not in runs:
                    runs[t] = collaborative_run(
                        model,
                        k,
                        view,
                        cls(t),
                        prompts,
                        references,
                        measure,
                        max_new_tokens=max_new_tokens,
                        codec=codec,
                        eos_token_id=eos,
                    )
                    runs[t]["cloud_compute_vs_cloud_only"] = runs[t]["cloud_compute"] / (only / n_tokens)
                    if bar is not None:
                        bar.update(1)
                return runs[t]

            def extra(t: float, run=run) -> dict[str, Any]:
                return {key: v for key, v in run(t).items() if key != "losses"}

            chosen, table = ltt_select(thresholds, lambda t, run=run: run(t)["losses"], delta, level, extra)
            row = next((r for r in table if r["threshold"] == chosen), None)
            results.append(
                {
                    "split": k,
                    "exits": list(view.layers),
                    "threshold": chosen,
                    "epsilon": level,
                    "edge_layers": k + len(view.layers) * cost,
                    "cloud_compute": None if row is None else row["cloud_compute"],
                    "table": table,
                }
            )
    finally:
        if bar is not None:
            bar.close()
    certified = [r for r in results if r["threshold"] is not None]
    best = min(certified, key=lambda r: (r["cloud_compute"], r["split"])) if certified else None
    return SplitCalibration(
        split=None if best is None else best["split"],
        criterion=criterion,
        threshold=None if best is None else best["threshold"],
        delta=delta,
        epsilon=epsilon,
        n=len(prompts),
        consistency=consistency,
        codec=codec,
        max_new_tokens=max_new_tokens,
        num_layers=n_layers,
        candidates=results,
    )


__all__ = [
    "CONSISTENCY",
    "ExitView",
    "SplitCalibration",
    "calibrate_split",
    "collaborative_run",
    "default_splits",
    "head_cost",
    "identical",
]
