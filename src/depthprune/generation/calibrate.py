"""Choose a token exit threshold with a sequence-level guarantee (CALM's Learn-then-Test for generation).

Goal: with probability >= 1 - epsilon over the draw of the calibration prompts, the expected consistency of an
early-exit continuation with the full model's greedy continuation of the same prompt is >= 1 - delta. Consistency, the
user's choice (both in [0, 1], 1 = identical):

- "tokens": the share of positions where the two continuations hold the same token (the longer continuation sets the
  count, so a continuation that stops early or runs on loses the positions it lacks);
- "rouge_l": ROUGE-L F1 on token ids (longest common subsequence; CALM's textual consistency).

The per-prompt loss is 1 - consistency; the thresholds of the criterion's grid are tested from the most conservative
to the most aggressive with `depthprune.exits.calibrate.ltt_select` (fixed-sequence testing, stopping at the first
threshold whose risk cannot be shown <= delta; exact binomial p-values when every loss is 0 or 1, Hoeffding's bound
otherwise). The full model's continuations are generated once; each tested threshold generates the calibration
prompts once more, in batches, with `early_exit_generate`.

What a run may use without a guarantee is decided here too: `certifying_record` finds the saved calibration that
certifies a criterion at its threshold (the command line refuses any other unless asked), and
`teacher_forced_agreement` measures in one forward pass how often exits (and a criterion's choice among them) agree
with the full model on given text, for the warning an uncalibrated run prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune.decoding import special_tokens
from depthprune.exits.lm_heads import ExitHeadsLike
from depthprune.exits.token_criteria import (
    TokenCriterion,
    TokenState,
    criterion_class,
    list_criteria,
    make_criterion,
)
from depthprune.generation.generate import early_exit_generate
from depthprune.ltt import ltt_select
from depthprune.registry import KV_STRATEGIES

CONSISTENCY = ("tokens", "rouge_l")


# ---- consistency of two continuations ---------------------------------------------------------------------------
def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 of two token sequences: 2 P R / (P + R) with P = LCS / len(candidate), R = LCS / len(reference).
    Two empty sequences are identical (1.0)."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    return 0.0 if lcs == 0 else 2.0 * lcs / (len(candidate) + len(reference))


def token_consistency(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Share of positions holding the same token in both sequences, over the longer one's length (1.0 if both are
    empty)."""
    n = max(len(candidate), len(reference))
    if n == 0:
        return 1.0
    return sum(int(x == y) for x, y in zip(candidate, reference, strict=False)) / n


def consistency_fn(name: str):
    """The consistency measure called `name` ("tokens" or "rouge_l"): (candidate, reference) -> float in [0, 1]."""
    if name == "tokens":
        return token_consistency
    if name == "rouge_l":
        return rouge_l
    raise ValueError(f"unknown consistency measure {name!r}; choose one of {', '.join(CONSISTENCY)}")


# ---- prompts and continuations ----------------------------------------------------------------------------------
def prompt_blocks(tokenizer: Any, text: str, n: int, prompt_len: int) -> torch.Tensor:
    """`n` prompts of `prompt_len` token ids each, LongTensor [n, prompt_len]: non-overlapping blocks of `text`,
    spread evenly over it (so they come from all of the text, not its first pages)."""
    from depthprune.data import token_blocks

    if n < 1:
        raise ValueError(f"give at least one prompt, got n={n}")
    blocks = token_blocks(tokenizer, text, prompt_len)  # [available, prompt_len]
    if len(blocks) < n:
        raise ValueError(
            f"the text holds only {len(blocks)} blocks of {prompt_len} tokens, too few for {n} prompts; "
            "pass a longer text, fewer prompts or a shorter prompt length"
        )
    pick = torch.linspace(0, len(blocks) - 1, n).round().long()
    return blocks[pick]


def _cut(tokens: list[int], eos: list[int]) -> list[int]:
    """A continuation up to and including its first end-of-sequence token."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> list[list[int]]:
    """The full model's greedy continuations of `prompts` [n, prompt_len] by plain `model.generate` (ending at the
    first end-of-sequence token, which is kept). eos_token_id: None takes the model's; () never stops early."""
    eos, pad = special_tokens(model, _eos_arg(eos_token_id), pad_token_id)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for ids in prompts.split(batch_size):
        ids = ids.to(device)  # [b, prompt_len]
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos),
            pad_token_id=pad,
        )
        out.extend(_cut(row, eos) for row in seq[:, ids.shape[1] :].tolist())
    return out


@dataclasses.dataclass
class Continuations:
    """Early-exit continuations of a set of prompts: tokens (up to the first end of sequence) and their exit layers
    (0-based; num_layers - 1 = full depth)."""

    tokens: list[list[int]]
    exit_layers: list[list[int]]
    num_layers: int

    def mean_layers(self) -> float:
        """Decoder layers run per generated token, over all prompts."""
        flat = [layer + 1 for row in self.exit_layers for layer in row]
        return sum(flat) / len(flat) if flat else float("nan")


@torch.no_grad()
def early_exit_continuations(
    model: nn.Module,
    heads: ExitHeadsLike,
    prompts: torch.Tensor,
    criterion: TokenCriterion | str,
    max_new_tokens: int,
    *,
    kv: str = "propagate",
    deep_prefill: bool = True,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Continuations:
    """`early_exit_generate` over `prompts` [n, prompt_len] in batches; continuations cut as `greedy_continuations`
    cuts them."""
    eos, pad = special_tokens(model, _eos_arg(eos_token_id), pad_token_id)
    device = next(model.parameters()).device
    tokens: list[list[int]] = []
    layers: list[list[int]] = []
    num_layers = heads.num_layers
    for ids in prompts.split(batch_size):
        ids = ids.to(device)  # [b, prompt_len]
        out = early_exit_generate(
            model,
            heads,
            ids,
            criterion=criterion,
            max_new_tokens=max_new_tokens,
            kv=kv,
            deep_prefill=deep_prefill,
            eos_token_id=tuple(eos),
            pad_token_id=pad,
        )
        num_layers = out.num_layers
        for row, exits in zip(out.sequences[:, ids.shape[1] :].tolist(), out.exit_layers.tolist(), strict=True):
            keep = [i for i, e in enumerate(exits) if e >= 0]  # -1: padding after the end of sequence
            tokens.append([row[i] for i in keep])
            layers.append([exits[i] for i in keep])
    return Continuations(tokens, layers, num_layers)


def _eos_arg(eos: int | Sequence[int] | None) -> int | list[int] | None:
    return eos if eos is None or isinstance(eos, int) else list(eos)


# ---- calibration ------------------------------------------------------------------------------------------------
def supported_criteria(heads: ExitHeadsLike) -> list[str]:
    """The token criteria these heads can drive ('learned' needs CALM's confidence classifier)."""
    config = getattr(heads, "config", None)
    has_confidence = bool(getattr(config, "confidence", False))
    return [n for n in list_criteria() if "confidence" not in criterion_class(n).needs or has_confidence]


@dataclasses.dataclass
class GenerationCalibration:
    """Result of calibrating one token criterion: the chosen threshold (None if even the most conservative
    candidate fails) and one table row per tested threshold (threshold, risk, p_value, rejected, mean_layers,
    consistency)."""

    criterion: str
    threshold: float | None
    delta: float
    epsilon: float
    n: int
    consistency: str
    table: list[dict[str, Any]]
    max_new_tokens: int
    kv: str = "propagate"
    deep_prefill: bool = True
    num_layers: int | None = None

    def guarantee(self) -> str:
        measure = "token agreement" if self.consistency == "tokens" else "ROUGE-L F1"
        setting = (
            f"kv={self.kv}, {'deep' if self.deep_prefill else 'shallow'} prefill, {self.max_new_tokens} new tokens"
        )
        if self.threshold is None:
            return (
                f"{self.criterion}: no threshold certified: even the most conservative candidate could not be shown to "
                f"keep the expected {measure} with the full model's greedy output >= {1 - self.delta:g} at "
                f"confidence {1 - self.epsilon:g} on {self.n} calibration prompts ({setting}); use more prompts or a "
                "larger delta"
            )
        return (
            f"{self.criterion}:{self.threshold:g} -- with probability >= {1 - self.epsilon:g} over the calibration "
            f"draw ({self.n} prompts), the expected {measure} of an early-exit continuation with the full model's "
            f"greedy continuation, on new prompts from the same distribution, is >= {1 - self.delta:g} ({setting}; "
            "Learn-then-Test, fixed-sequence testing, exact binomial p-values for 0/1 losses, Hoeffding otherwise)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}


def _check_setup(model: nn.Module, heads: ExitHeadsLike, consistency: str, kv: str, max_new_tokens: int) -> None:
    from depthprune.adapters.registry import get_adapter

    consistency_fn(consistency)
    KV_STRATEGIES.check(kv)  # an unknown name lists the registered strategies
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    depth = get_adapter(model).num_layers(model).get("decoder")
    if depth != heads.num_layers:
        raise ValueError(
            f"the exit heads were built for a {heads.num_layers}-layer decoder, the model has {depth} decoder layers; "
            "use the heads with the model they were trained on"
        )


def calibrate_generation(
    model: nn.Module,
    heads: ExitHeadsLike,
    prompts: torch.Tensor,
    criterion: str,
    *,
    delta: float = 0.2,
    epsilon: float = 0.05,
    consistency: str = "tokens",
    max_new_tokens: int = 32,
    kv: str = "propagate",
    deep_prefill: bool = True,
    grid: Sequence[float] | None = None,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    references: list[list[int]] | None = None,
    progress: bool = False,
) -> GenerationCalibration:
    """Pick the most aggressive threshold of token criterion `criterion` (a name, see `depthprune.exits.token_criteria`)
    certified to keep the expected `consistency` with the full model's greedy continuation >= 1 - delta, with
    probability >= 1 - epsilon over the draw of `prompts` [n, prompt_len].

    grid: candidate thresholds, most conservative first (default: the criterion's own `grid()`). references: the full
    model's continuations of `prompts` if already computed (`greedy_continuations`, same eos and max_new_tokens).
    """
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise ValueError(f"delta and epsilon must lie in (0, 1); got delta={delta}, epsilon={epsilon}")
    _check_setup(model, heads, consistency, kv, max_new_tokens)
    cls = criterion_class(criterion)
    if criterion not in supported_criteria(heads):
        raise ValueError(
            f"the {criterion!r} criterion needs exit heads with CALM's confidence classifier; these heads support "
            f"{', '.join(supported_criteria(heads))}"
        )
    if prompts.dim() != 2 or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty [n, prompt_len] tensor, got shape {tuple(prompts.shape)}")
    thresholds = list(grid) if grid is not None else cls.grid()
    measure = consistency_fn(consistency)
    gen = {"batch_size": batch_size, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if references is None:
        references = greedy_continuations(model, prompts, max_new_tokens, **gen)
    if len(references) != len(prompts):
        raise ValueError(f"{len(references)} reference continuations for {len(prompts)} prompts")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(thresholds), desc=f"calibrate {criterion}", unit="threshold")
    runs: dict[float, tuple[torch.Tensor, float]] = {}

    def run(t: float) -> tuple[torch.Tensor, float]:
        if t not in runs:
            got = early_exit_continuations(
                model, heads, prompts, cls(t), max_new_tokens, kv=kv, deep_prefill=deep_prefill, **gen
            )
            scores = [measure(c, r) for c, r in zip(got.tokens, references, strict=True)]
            runs[t] = (1.0 - torch.tensor(scores, dtype=torch.float64), got.mean_layers())
            if bar is not None:
                bar.update(1)
        return runs[t]

    def extra_of(t: float) -> dict[str, Any]:
        losses, mean_layers = run(t)
        return {"consistency": float(1.0 - losses.mean()), "mean_layers": mean_layers}

    try:
        chosen, table = ltt_select(thresholds, lambda t: run(t)[0], delta, epsilon, extra_of)
    finally:
        if bar is not None:
            bar.close()
    return GenerationCalibration(
        criterion=criterion,
        threshold=chosen,
        delta=delta,
        epsilon=epsilon,
        n=len(prompts),
        consistency=consistency,
        table=table,
        max_new_tokens=max_new_tokens,
        kv=kv,
        deep_prefill=deep_prefill,
        num_layers=heads.num_layers,
    )


def check(
    model: nn.Module,
    heads: ExitHeadsLike,
    prompts: torch.Tensor,
    criterion: TokenCriterion | str,
    *,
    max_new_tokens: int = 32,
    kv: str = "propagate",
    deep_prefill: bool = True,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    references: list[list[int]] | None = None,
) -> dict[str, float]:
    """Held-out figures of a criterion on `prompts` [n, prompt_len]: mean token agreement and ROUGE-L F1 with the
    full model's greedy continuations, share of prompts continued identically, and mean decoder layers per token."""
    _check_setup(model, heads, "tokens", kv, max_new_tokens)
    gen = {"batch_size": batch_size, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if references is None:
        references = greedy_continuations(model, prompts, max_new_tokens, **gen)
    got = early_exit_continuations(
        model, heads, prompts, criterion, max_new_tokens, kv=kv, deep_prefill=deep_prefill, **gen
    )
    pairs = list(zip(got.tokens, references, strict=True))
    return {
        "tokens": sum(token_consistency(c, r) for c, r in pairs) / len(pairs),
        "rouge_l": sum(rouge_l(c, r) for c, r in pairs) / len(pairs),
        "identical": sum(int(c == r) for c, r in pairs) / len(pairs),
        "mean_layers": got.mean_layers(),
        "num_layers": got.num_layers,
        "n": len(pairs),
    }


# ---- what a saved calibration certifies, and what an uncalibrated criterion does -------------------------------------
def certified_thresholds(record: dict[str, Any]) -> list[float]:
    """The thresholds one saved calibration result (an entry of calibration.json, `GenerationCalibration.to_dict`)
    certifies: every tested threshold whose null hypothesis was rejected (fixed-sequence testing: the chosen one and
    every more conservative one before it)."""
    if record.get("threshold") is None:
        return []
    return [float(row["threshold"]) for row in record.get("table", []) if row.get("rejected")]


def certifying_record(
    records: Sequence[dict[str, Any]],
    criterion: TokenCriterion,
    *,
    kv: str | None = None,
    deep_prefill: bool | None = None,
) -> dict[str, Any] | None:
    """The saved generation calibration (an entry of calibration.json) that certifies `criterion` at its threshold,
    with the same KV strategy and prefill when given, or None."""
    for record in records:
        if record.get("criterion") != criterion.name or "consistency" not in record:
            continue
        if kv is not None and record.get("kv", "propagate") != kv:
            continue
        if deep_prefill is not None and bool(record.get("deep_prefill", True)) != deep_prefill:
            continue
        if any(abs(t - float(criterion.threshold)) <= 1e-12 for t in certified_thresholds(record)):
            return record
    return None


def calibrated_criterion(records: Sequence[dict[str, Any]]) -> tuple[TokenCriterion, dict[str, Any]] | None:
    """The first token criterion a saved calibration certified, at its chosen threshold, and its record; or None."""
    for record in records:
        if record.get("threshold") is not None and "consistency" in record:
            return make_criterion(record["criterion"], record["threshold"]), record
    return None


@torch.no_grad()
def teacher_forced_agreement(
    model: nn.Module,
    heads: ExitHeadsLike,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    criterion: TokenCriterion | None = None,
) -> dict[str, Any]:
    """How closely exits follow the full model on given text, by teacher forcing (one forward pass, every position
    sees the true prefix): an optimistic estimate of what generation with them gives (there one early mistake
    changes every later prefix).

    input_ids / attention_mask: [batch, seq]; only real positions count. Returns positions; per_layer: {exit layer:
    share of positions where the exit's top token equals the full model's}; with a criterion, also agreement (share of
    positions where the token of the exit the criterion picks, the first one it fires at, else the full model's,
    equals the full model's) and mean_layers (decoder layers run per position under the criterion).
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    real = mask.bool()  # [batch, seq]
    full = out.logits.argmax(-1)[real]  # [n] the full model's next token at each real position
    n = int(full.numel())
    depth = heads.num_layers
    per_layer: dict[int, float] = {}
    chosen = full.clone()
    layer_of = torch.full_like(full, depth - 1)
    open_ = torch.ones_like(full, dtype=torch.bool)  # positions the criterion has not exited yet
    for layer in heads.layers:
        hidden = out.hidden_states[layer + 1]  # [batch, seq, hidden] leaving `layer` (never the last: no final norm)
        logits = heads.logits(layer, hidden)[real]  # [n, vocab]
        top = logits.argmax(-1)
        per_layer[int(layer)] = float((top == full).float().mean()) if n else float("nan")
        if criterion is None:
            continue
        conf = heads.confidence(layer, hidden)
        state = TokenState(
            layer,
            depth,
            hidden[real],
            out.hidden_states[layer][real],
            logits=logits,
            confidence=None if conf is None else conf[real],
        )
        go = criterion.decide(state).to(torch.bool).reshape(-1) & open_
        chosen[go], layer_of[go] = top[go], layer
        open_ &= ~go
    result: dict[str, Any] = {"positions": n, "num_layers": depth, "per_layer": per_layer}
    if criterion is not None:
        result["agreement"] = float((chosen == full).float().mean()) if n else float("nan")
        result["mean_layers"] = float((layer_of + 1).float().mean()) if n else float("nan")
    return result


__all__ = [
    "CONSISTENCY",
    "Continuations",
    "GenerationCalibration",
    "calibrate_generation",
    "calibrated_criterion",
    "certified_thresholds",
    "certifying_record",
    "check",
    "consistency_fn",
    "early_exit_continuations",
    "greedy_continuations",
    "lcs_length",
    "prompt_blocks",
    "rouge_l",
    "supported_criteria",
    "teacher_forced_agreement",
    "token_consistency",
]
