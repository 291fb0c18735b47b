"""Big/little cascades (BiLD, Kim et al. 2023), batched, greedy or sampling, for any pair of causal LMs that share a
tokenizer; and the encoder cascade (a pruned classifier first, the full one for the rows it is unsure of).

Three modes, one loop. Each round, the little model runs from the row's newest token d_0 (committed, not yet in
either cache) and proposes tokens d_1..d_m one at a time, greedily; the big model then reads d_0..d_m in ONE forward
(its logits after each of them) and the round keeps a leading part of the little run plus one token of the big
model's own:

- "fallback" (BiLD's fallback policy): the little model decides; it stops, and hands the next token to the big model,
  at the first position where its confidence (max softmax probability) is not above the `fallback` threshold (or
  after `draft_len` tokens). Every little token is kept; the big model's forward over them fills its cache and gives
  the token that follows them.
- "rollback" (BiLD's fallback + rollback policies): as fallback, but the big model rewrites from the first little
  token d_i to which it gives probability p_big(d_i) < `rollback` (BiLD's distance d = -log p_big(d_i) > alpha_RB, with
  alpha_RB = -log(rollback), for a greedy little model); d_i becomes the big model's own argmax.
- "lossless" (speculative decoding with the little model as drafter): the little model drafts up to `draft_len`
  tokens (stopping early where its confidence is not above `fallback`, default 0: never), kept while they equal the
  big model's argmax. The output is the big model's greedy output, token for token.

Neutral settings (the big model decides every token, so the output is the big model's greedy output): fallback=1
(no confidence is above 1), or rollback=1 (no little token survives unless the big model is certain of it).

Sampling (`do_sample=True`): the little model draws its run, the big model draws the token after the kept part; in
"lossless" the little tokens are kept by speculative rejection sampling (Leviathan et al. 2023), so the output is
distributed exactly as sampling from the big model alone; "fallback" and "rollback" sample from whichever model
decides a token.

Caches: each model has its own full-length cache (`depthprune.kv.decoder_cache`); both are fed the same columns
d_0..d_M each round (M: the longest little run in the batch), so one 2D mask serves both. A row keeps the columns of
the tokens it committed; columns that no row keeps are cropped and the rest are masked, with the rows' real columns
moved together for models with sliding-window layers, exactly as `depthprune.generation.speculative` does. Rows whose
little run stopped early are fed a dummy token in the remaining columns (masked afterwards; causal attention keeps it
out of the row's earlier positions). Both models run their own forward (embedding, layers, head) on their own cache.

Thresholds: `calibrate_cascade` picks the most aggressive fallback / rollback threshold certified by Learn-then-Test
(`depthprune.ltt`) to keep the expected token agreement with the big model's greedy continuation >= 1 - delta, as
`depthprune.generation.calibrate` does for exit thresholds; `calibrate_encoder_cascade` certifies the encoder
cascade's threshold on the accuracy drop (or disagreement), as `depthprune.exits.calibrate` does for exits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from depthprune.decoding import (
    decoder_parts,
    positions_from_mask,
    prompt_mask,
    special_tokens,
    step_inputs,
    wall_time,
)
from depthprune.errors import DepthpruneError
from depthprune.generation.acceptance import sampling_probs, speculative_accept
from depthprune.generation.calibrate import greedy_continuations, token_consistency
from depthprune.kv import check_cache, decoder_cache, has_sliding_layers, left_align, truncate_layer
from depthprune.ltt import ltt_select
from depthprune.runner import capture_stack

MODES = ("fallback", "rollback", "lossless")
ENCODER_RISKS = ("accuracy_drop", "disagreement")
BIG, LITTLE = 1, 0  # CascadeOutput.source values; -1: padding after the row's end


class CascadeError(DepthpruneError, ValueError):
    """A cascade's models, tokenizers or settings do not fit together."""


# ---- checks ---------------------------------------------------------------------------------------------------------
def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def check_tokenizers(big_tokenizer: Any, little_tokenizer: Any) -> None:
    """Raise CascadeError unless the two tokenizers map the same strings to the same ids, with the same special
    tokens (a cascade compares the two models' distributions token id by token id)."""
    if big_tokenizer is little_tokenizer:
        return
    big_vocab, little_vocab = big_tokenizer.get_vocab(), little_tokenizer.get_vocab()
    if big_vocab != little_vocab:
        only_big = sorted(set(big_vocab) - set(little_vocab))[:5]
        differ = sorted(t for t in set(big_vocab) & set(little_vocab) if big_vocab[t] != little_vocab[t])[:5]
        raise CascadeError(
            f"the big and little models' tokenizers differ ({len(big_vocab)} vs {len(little_vocab)} tokens; e.g. only "
            f"in the big one: {only_big}, other ids: {differ}); a cascade needs one tokenizer for both models: pair "
            "models of one family (or a pruned copy of the big model)"
        )
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(big_tokenizer, name, None), getattr(little_tokenizer, name, None)
        if a != b:
            raise CascadeError(f"the big and little tokenizers' {name} differ ({a!r} vs {b!r}); give one tokenizer")


def check_pair(
    big: nn.Module, little: nn.Module, big_tokenizer: Any = None, little_tokenizer: Any = None
) -> tuple[int, int]:
    """Raise CascadeError unless `big` and `little` are decoder-only causal LMs over the same vocabulary with the same
    special tokens (and, when given, the same tokenizer); return their decoder depths (big, little)."""
    depths = []
    for role, model in (("big", big), ("little", little)):
        try:
            parts = decoder_parts(model, f"a cascade's {role} model")
        except ValueError as err:
            raise CascadeError(f"{err} (the {role} model of a cascade must be a decoder-only causal LM)") from None
        depths.append((len(parts.layers), parts.adapter.head(model).weight.shape[0]))
    (big_depth, big_vocab), (little_depth, little_vocab) = depths
    if big_vocab != little_vocab:
        raise CascadeError(
            f"the big model predicts {big_vocab} tokens and the little one {little_vocab}: a cascade needs two models "
            "with one tokenizer and vocabulary (e.g. a pruned copy of the big model, or a smaller model of its family)"
        )
    for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a = _ids(getattr(big.generation_config, field, None) or getattr(big.config, field, None))
        b = _ids(getattr(little.generation_config, field, None) or getattr(little.config, field, None))
        if a and b and set(a) != set(b):
            raise CascadeError(
                f"the big and little models' {field} differ ({list(a)} vs {list(b)}): they do not share a tokenizer"
            )
    if (big_tokenizer is None) != (little_tokenizer is None):
        raise CascadeError("give both tokenizers (big and little) or neither")
    if big_tokenizer is not None:
        check_tokenizers(big_tokenizer, little_tokenizer)
    return big_depth, little_depth


def _check_threshold(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise CascadeError(f"{name} is a probability threshold in [0, 1], got {value!r}")
    return float(value)


def cascade_settings(
    mode: str, fallback: float | None, rollback: float | None, draft_len: int
) -> tuple[float, float | None]:
    """(fallback, rollback) of a mode, with their defaults, or a CascadeError for settings that do not fit."""
    if mode not in MODES:
        raise CascadeError(f"unknown cascade mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise CascadeError(f"draft_len (the longest little run per round) must be an integer >= 1, got {draft_len!r}")
    fallback, rollback = _check_threshold("fallback", fallback), _check_threshold("rollback", rollback)
    if mode == "fallback":
        if rollback is not None:
            raise CascadeError("rollback= applies to mode='rollback'; mode='fallback' keeps every little token")
        if fallback is None:
            raise CascadeError(
                "mode='fallback' needs fallback=: the little confidence below which the big model decides"
            )
    if mode == "rollback":
        if rollback is None:
            raise CascadeError("mode='rollback' needs rollback=: the big model's probability of a little token below "
                               "which it rewrites from there")  # fmt: skip
        fallback = 0.0 if fallback is None else fallback
    if mode == "lossless":
        if rollback is not None:
            raise CascadeError(
                "rollback= applies to mode='rollback'; mode='lossless' keeps only the big model's argmax"
            )
        fallback = 0.0 if fallback is None else fallback
    return fallback, rollback


# ---- generation -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CascadeOutput:
    """sequences: [batch, prompt + new] token ids (rows padded with pad_token_id after their end-of-sequence token, as
    `model.generate` returns them); source: [batch, new] which model decided each new token (1 big, 0 little, -1
    padding). rounds: big-model forwards after the prefill; little_steps: little-model forwards after the prefill.
    drafted / accepted: little tokens the big model read / kept, over all rows."""

    sequences: torch.Tensor
    source: torch.Tensor
    mode: str
    fallback: float
    rollback: float | None
    draft_len: int
    rounds: int
    little_steps: int
    drafted: int
    accepted: int
    wall_s: float

    def little_share(self) -> float:
        """Share of the new tokens the little model decided."""
        real = self.source >= 0
        return float((self.source == LITTLE).sum()) / max(1, int(real.sum()))

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "fallback": self.fallback,
            "rollback": self.rollback,
            "draft_len": self.draft_len,
            "rounds": self.rounds,
            "little_steps": self.little_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "little_share": self.little_share(),
            "wall_s": self.wall_s,
        }


def cascade_generate(
    big: nn.Module,
    little: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    mode: str = "lossless",
    fallback: float | None = None,
    rollback: float | None = None,
    draft_len: int = 4,
    max_new_tokens: int,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    big_tokenizer: Any = None,
    little_tokenizer: Any = None,
    little_vocab: torch.Tensor | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> CascadeOutput:
    """Big/little cascade decoding of left-padded prompts input_ids [batch, seq] (see the module docstring).

    mode "fallback" needs `fallback`; "rollback" needs `rollback` (fallback defaults to 0: the little model runs
    `draft_len` tokens a round); "lossless" takes an optional `fallback` (stop drafting early) and is token-identical
    to `big.generate(do_sample=False)`. draft_len: the longest little run per round. eos_token_id / pad_token_id: None
    takes the big model's generation config; () never stops early. Tokenizers, when given, are compared.
    little_vocab: token ids the little model's head projects onto (its runs and confidences are over these only,
    e.g. `depthprune.exits.vocab_heads.frequent_tokens` of calibration text): the head of a small LM costs several
    layers; the big model always reads the full vocabulary.
    do_sample: draw tokens from softmax(logits / temperature) (top_k-filtered, if given) with `generator`, as
    `generate(do_sample=True)` does: the little model samples its run (its confidence is still its max probability),
    the big model samples the token after the kept run; "lossless" accepts little tokens by speculative rejection
    sampling (`acceptance.speculative_accept`), so every token is distributed exactly as sampling from the big model.
    "fallback" and "rollback" sample from whichever model decides (BiLD's policies: not the big model's distribution).
    """
    fallback, rollback = cascade_settings(mode, fallback, rollback, draft_len)
    if do_sample:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise CascadeError(f"temperature must be > 0 for sampling, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise CascadeError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if max_new_tokens < 1:
        raise CascadeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    big_depth, little_depth = check_pair(big, little, big_tokenizer, little_tokenizer)
    mask = prompt_mask(input_ids, attention_mask)
    if not bool(mask[:, -1].all()):
        raise CascadeError("cascade decoding needs left-padded prompts: every row's last position must be real")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos, pad = special_tokens(big, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=device)
    caches = (
        decoder_cache(big, big_depth, "cascade decoding"),
        decoder_cache(little, little_depth, "cascade decoding"),
    )
    contiguous = has_sliding_layers(big) or has_sliding_layers(little)

    out = input_ids.new_full((batch, max_new_tokens + draft_len + 1), pad)
    source = torch.full_like(out, -1)
    generated = torch.zeros(batch, dtype=torch.long, device=device)
    rounds = little_steps = drafted_total = accepted_total = 0

    def forward(model: nn.Module, cache: DynamicCache, ids: torch.Tensor, m: torch.Tensor, pos: torch.Tensor):
        return model(**step_inputs(model, ids, m, pos, cache)).logits  # [n, s, vocab]

    subset = None if little_vocab is None else _SubsetHead(little, little_vocab)
    vocab = decoder_parts(big, "a cascade's big model").adapter.head(big).weight.shape[0]

    def little_next(ids: torch.Tensor, m: torch.Tensor, pos: torch.Tensor):
        """(confidence [n], token [n], q [n, vocab] or None) of the little model after ids [n, 1]: greedy, or drawn
        from q, the distribution it samples from (over the full vocabulary; zero outside `little_vocab`)."""
        if subset is None:
            logits = forward(little, caches[1], ids, m, pos)[:, -1]
        else:
            h, call = capture_stack(little, step_inputs(little, ids, m, pos, caches[1]))
            logits = subset(call.run(h, 0, little_depth))[:, -1]  # [n, K]
        if not do_sample:
            conf, at = torch.softmax(logits.float(), dim=-1).max(-1)
            return conf, (at if subset is None else subset.token_ids[at]), None
        conf = torch.softmax(logits.float(), dim=-1).max(-1).values
        q = sampling_probs(logits, temperature, top_k)
        if subset is not None:
            q = q.new_zeros((q.shape[0], vocab)).index_copy_(1, subset.token_ids, q)
        return conf, torch.multinomial(q, 1, generator=generator)[:, 0], q

    with torch.no_grad():
        start = wall_time(device)
        if prompt_len > 1:  # the prompt but its last token (the first round's d_0) fills both caches
            positions = positions_from_mask(mask)
            for model, cache, depth in ((big, caches[0], big_depth), (little, caches[1], little_depth)):
                model(**step_inputs(model, input_ids[:, :-1], mask[:, :-1], positions[:, :-1], cache, last_logits=True))
                check_cache(cache, depth)
        rows = torch.arange(batch, device=device)
        last = input_ids[:, -1]  # [n] d_0 of each running row
        cmask = mask[:, :-1]  # [n, C] real columns of both caches

        while rows.numel():
            n, columns = rows.numel(), cmask.shape[1]
            k = min(draft_len, max_new_tokens - int(generated[rows].min()) - 1)  # no row can keep more
            base = cmask.sum(-1, keepdim=True)  # [n, 1] position id of d_0
            drafts: list[torch.Tensor] = []
            qs: list[torch.Tensor] = []  # sampling: the little distributions the drafts were drawn from
            running = torch.ones(n, dtype=torch.bool, device=device)  # rows whose little run goes on
            runs = torch.zeros(n, dtype=torch.long, device=device)  # m per row
            token = last
            for j in range(k + 1):  # feed d_j to the little model
                ext = torch.cat([cmask, cmask.new_ones((n, j + 1))], dim=1)
                if j == k:  # the last little token only enters the little cache: its layers run, not its head
                    h, call = capture_stack(little, step_inputs(little, token[:, None], ext, base + j, caches[1]))
                    call.run(h, 0, little_depth)
                    little_steps += 1
                    break
                conf, nxt, q = little_next(token[:, None], ext, base + j)
                little_steps += 1
                running &= conf > fallback
                if not bool(running.any()):
                    break
                runs += running.long()
                token = torch.where(running, nxt.to(last.dtype), last)  # stopped rows: a dummy, masked later
                drafts.append(token)
                if q is not None:
                    qs.append(q)
            width = len(drafts) + 1  # columns d_0..d_M both models are fed this round
            d = torch.stack(drafts, dim=1) if drafts else last.new_zeros((n, 0))  # [n, M]
            ext = torch.cat([cmask, cmask.new_ones((n, width))], dim=1)
            pos = base + torch.arange(width, device=device)
            target = forward(big, caches[0], torch.cat([last[:, None], d], dim=1), ext, pos)  # [n, M + 1, vocab]
            rounds += 1
            idx_d = torch.arange(width - 1, device=device)
            valid = idx_d < runs[:, None]  # [n, M]
            if do_sample and mode == "lossless":
                q_all = torch.stack(qs, dim=1) if qs else target.new_zeros((n, 0, vocab))
                accepted, nxt = speculative_accept(
                    sampling_probs(target, temperature, top_k), q_all, d, generator, valid=valid
                )
                nxt = nxt[:, None]
            else:
                if mode == "fallback":
                    ok = valid
                elif mode == "rollback":
                    big_p = sampling_probs(target[:, :-1], temperature, top_k) if do_sample else None
                    big_p = torch.softmax(target[:, :-1].float(), dim=-1) if big_p is None else big_p
                    p_d = big_p.gather(-1, d[..., None])[..., 0]
                    ok = valid & (p_d >= rollback)
                else:
                    ok = valid & (d == target[:, :-1].argmax(-1))
                accepted = ok.long().cumprod(1).sum(1)  # [n] leading little tokens kept
                after = target.gather(1, accepted[:, None, None].expand(n, 1, target.shape[-1]))[:, 0]  # [n, vocab]
                if do_sample:  # the big model's token after them
                    nxt = torch.multinomial(sampling_probs(after, temperature, top_k), 1, generator=generator)
                else:
                    nxt = after.argmax(-1, keepdim=True)
            drafted_total += int(runs.sum())
            accepted_total += int(accepted.sum())

            idx = torch.arange(width, device=device)
            new = torch.where(idx < accepted[:, None], torch.cat([d, nxt.to(d.dtype)], dim=1), nxt.to(d.dtype))
            src = torch.where(idx < accepted[:, None], LITTLE, BIG)
            budget = max_new_tokens - generated[rows]
            keep = torch.minimum(accepted + 1, budget)
            ended = keep == budget
            if eos:
                hit = torch.isin(new, eos_t) & (idx < keep[:, None])
                first = torch.where(hit, idx, width).min(1).values
                ended |= hit.any(1)
                keep = torch.minimum(keep, first + 1)
            at = generated[rows][:, None] + idx
            out[rows[:, None], at] = torch.where(idx < keep[:, None], new, pad)
            source[rows[:, None], at] = torch.where(idx < keep[:, None], src, -1)
            generated[rows] += keep

            longest = int(keep.max())  # columns C..C+keep-1 hold d_0..d_{keep-1} in both caches: exact
            for cache in caches:
                for layer in cache.layers:
                    truncate_layer(layer, columns + longest)
            new_mask = torch.cat([cmask, (idx[:longest] < keep[:, None]).to(cmask.dtype)], dim=1)
            if contiguous:
                shift = longest - keep
                left_align(caches[1], new_mask, shift)
                new_mask = left_align(caches[0], new_mask, shift)
            cmask = new_mask
            last = new.gather(1, (keep - 1)[:, None])[:, 0]
            if bool(ended.any()):
                stay = (~ended).nonzero().flatten()
                if stay.numel():
                    for cache in caches:
                        cache.batch_select_indices(stay)
                rows, last, cmask = rows[stay], last[stay], cmask[stay]
        wall = wall_time(device) - start

    new_len = int(generated.max())
    return CascadeOutput(
        sequences=torch.cat([input_ids, out[:, :new_len]], dim=1),
        source=source[:, :new_len],
        mode=mode,
        fallback=fallback,
        rollback=rollback,
        draft_len=draft_len,
        rounds=rounds,
        little_steps=little_steps,
        drafted=drafted_total,
        accepted=accepted_total,
        wall_s=wall,
    )


class _SubsetHead(nn.Module):
    """A causal LM's own final step (final norm, projection, head rows, soft-cap) restricted to `token_ids`:
    hidden [b, s, hidden] leaving its last layer -> logits [b, s, K] (token_ids order). The head rows are copied."""

    def __init__(self, model: nn.Module, token_ids: torch.Tensor | Sequence[int]) -> None:
        super().__init__()
        parts = decoder_parts(model, "a cascade's little model")
        adapter, head = parts.adapter, parts.adapter.head(model)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=head.weight.device).reshape(-1)
        vocab = head.weight.shape[0]
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.unique().numel() != ids.numel():
            raise CascadeError(f"little_vocab must hold distinct token ids in 0..{vocab - 1}, at least one")
        self.token_ids = ids
        self.norm, self.proj, self.cap = (
            adapter.final_norm(model),
            adapter.final_projection(model),
            adapter.softcap(model),
        )
        self.weight = head.weight.detach().index_select(0, ids).clone()  # [K, head width]
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().index_select(0, ids).clone()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        state = self.norm(hidden) if self.norm is not None else hidden
        if self.proj is not None:
            state = self.proj(state)
        out = nn.functional.linear(state.to(self.weight.dtype), self.weight, self.bias)
        return torch.tanh(out / self.cap) * self.cap if self.cap else out


# ---- calibration of the generation thresholds ---------------------------------------------------------------------
DEFAULT_GRID = (1.0, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0)


@dataclasses.dataclass
class CascadeCalibration:
    """The most aggressive threshold Learn-then-Test certified (None: not even the most conservative one) and one row
    per tested threshold (threshold, risk, p_value, rejected, agreement, little_share)."""

    mode: str
    parameter: str  # "fallback" or "rollback": the threshold calibrated
    threshold: float | None
    fixed: dict[str, Any]  # the other settings (draft_len, the other threshold)
    delta: float
    epsilon: float
    n: int
    max_new_tokens: int
    table: list[dict[str, Any]]
    risk: str = "token disagreement"

    def guarantee(self) -> str:
        if self.threshold is None:
            return (
                f"{self.mode} cascade: no {self.parameter} threshold certified: even the most conservative could not "
                f"be shown to keep the expected {self.risk} with the big model's greedy output <= {self.delta:g} at "
                f"confidence {1 - self.epsilon:g} on {self.n} calibration samples; use more samples or a larger delta"
            )
        return (
            f"{self.mode} cascade, {self.parameter}={self.threshold:g} -- with probability >= {1 - self.epsilon:g} "
            f"over the calibration draw ({self.n} samples), the expected {self.risk} with the big model on new data "
            f"from the same distribution is <= {self.delta:g} (Learn-then-Test, fixed-sequence testing; exact "
            "binomial p-values for 0/1 losses, Hoeffding's bound otherwise)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}


def _grid(grid: Sequence[float] | None) -> list[float]:
    values = list(DEFAULT_GRID if grid is None else grid)
    for v in values:
        _check_threshold("a grid threshold", v)
    if not values:
        raise CascadeError("give at least one candidate threshold")
    return values


def cascade_continuations(
    big: nn.Module,
    little: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    **settings: Any,
) -> tuple[list[list[int]], float]:
    """Cascade continuations of `prompts` [n, prompt_len] in batches (cut after the first end-of-sequence token) and
    the share of their tokens the little model decided."""
    eos, pad = special_tokens(big, eos_token_id if eos_token_id is None or isinstance(eos_token_id, int)
                              else list(eos_token_id), pad_token_id)  # fmt: skip
    device = next(big.parameters()).device
    tokens: list[list[int]] = []
    little_count = total = 0
    for ids in prompts.split(batch_size):
        ids = ids.to(device)
        out = cascade_generate(
            big, little, ids, max_new_tokens=max_new_tokens, eos_token_id=tuple(eos), pad_token_id=pad, **settings
        )
        for row, src in zip(out.sequences[:, ids.shape[1] :].tolist(), out.source.tolist(), strict=True):
            keep = [i for i, s in enumerate(src) if s >= 0]
            tokens.append([row[i] for i in keep])
            little_count += sum(1 for i in keep if src[i] == LITTLE)
            total += len(keep)
    return tokens, little_count / max(1, total)


def calibrate_cascade(
    big: nn.Module,
    little: nn.Module,
    prompts: torch.Tensor,
    mode: str = "fallback",
    *,
    delta: float = 0.05,
    epsilon: float = 0.05,
    fallback: float | None = None,
    rollback: float | None = None,
    draft_len: int = 4,
    max_new_tokens: int = 32,
    grid: Sequence[float] | None = None,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    references: list[list[int]] | None = None,
    little_vocab: torch.Tensor | Sequence[int] | None = None,
) -> CascadeCalibration:
    """Learn-then-Test of a cascade threshold on token agreement with the big model's greedy continuations of
    `prompts` [n, prompt_len]: mode "fallback" calibrates `fallback`; mode "rollback" calibrates `rollback` at the
    given `fallback` (default 0). grid: candidates, most conservative (1.0: the big model decides) first. The per-prompt
    loss is 1 - token agreement (`depthprune.generation.calibrate.token_consistency`). little_vocab: as in
    `cascade_generate`."""
    if mode not in ("fallback", "rollback"):
        raise CascadeError(
            f"calibrate_cascade calibrates mode 'fallback' or 'rollback' ('lossless' is exact), got {mode!r}"
        )
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise CascadeError(f"delta and epsilon must lie in (0, 1); got delta={delta}, epsilon={epsilon}")
    parameter = mode
    if mode == "fallback" and (fallback is not None or rollback is not None):
        raise CascadeError("mode='fallback' calibrates the fallback threshold: give neither fallback= nor rollback=")
    if mode == "rollback" and rollback is not None:
        raise CascadeError("mode='rollback' calibrates the rollback threshold: give fallback= only (or nothing)")
    fixed = {"draft_len": draft_len} if mode == "fallback" else {"draft_len": draft_len, "fallback": fallback or 0.0}
    thresholds = _grid(grid)
    cascade_settings(mode, 0.0 if mode == "fallback" else fallback, 0.0 if mode == "rollback" else None, draft_len)
    check_pair(big, little)
    if prompts.dim() != 2 or len(prompts) == 0:
        raise CascadeError(f"prompts must be a non-empty [n, prompt_len] tensor, got shape {tuple(prompts.shape)}")
    gen = {"batch_size": batch_size, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if references is None:
        references = greedy_continuations(big, prompts, max_new_tokens, **gen)
    if len(references) != len(prompts):
        raise CascadeError(f"{len(references)} reference continuations for {len(prompts)} prompts")
    runs: dict[float, tuple[torch.Tensor, float]] = {}

    def run(t: float) -> tuple[torch.Tensor, float]:
        if t not in runs:
            settings = {"mode": mode, "draft_len": draft_len, parameter: t, "little_vocab": little_vocab}
            if mode == "rollback":
                settings["fallback"] = fixed["fallback"]
            got, share = cascade_continuations(big, little, prompts, max_new_tokens, **gen, **settings)
            scores = [token_consistency(c, r) for c, r in zip(got, references, strict=True)]
            runs[t] = (1.0 - torch.tensor(scores, dtype=torch.float64), share)
        return runs[t]

    def extra_of(t: float) -> dict[str, Any]:
        losses, share = run(t)
        return {"agreement": float(1.0 - losses.mean()), "little_share": share}

    chosen, table = ltt_select(thresholds, lambda t: run(t)[0], delta, epsilon, extra_of)
    return CascadeCalibration(
        mode, parameter, chosen, fixed, delta, epsilon, len(prompts), max_new_tokens, table, "token disagreement"
    )


# ---- encoder cascades -----------------------------------------------------------------------------------------------
def _classifier_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    if logits is None or logits.dim() != 2:
        raise CascadeError(
            f"{type(model).__name__} gave no [batch, labels] logits: an encoder cascade needs two sequence classifiers "
            "(AutoModelForSequenceClassification)"
        )
    return logits


def check_classifier_pair(big: nn.Module, little: nn.Module) -> None:
    """Raise CascadeError unless the two classifiers read the same vocabulary and predict the same labels."""
    for field in ("vocab_size", "num_labels"):
        a, b = getattr(big.config, field, None), getattr(little.config, field, None)
        if a != b:
            raise CascadeError(
                f"the big and little classifiers' {field} differ ({a} vs {b}): an encoder cascade needs one tokenizer "
                "and one label set (e.g. a pruned copy of the big classifier)"
            )
    if getattr(big.config, "is_decoder", False) or getattr(little.config, "is_decoder", False):
        raise CascadeError("an encoder cascade needs two sequence classifiers, not decoders")


@dataclasses.dataclass
class EncoderCascadeOutput:
    """predictions [batch]; logits [batch, labels] of the model that decided each row; big [batch] bool: the rows the
    big classifier decided; confidence [batch]: the little classifier's max softmax probability."""

    predictions: torch.Tensor
    logits: torch.Tensor
    big: torch.Tensor
    confidence: torch.Tensor

    def big_share(self) -> float:
        return float(self.big.float().mean())


def _sub_inputs(inputs: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows `rows` of a batch, with the trailing columns that are padding in all of them cut off."""
    sub = {k: v.index_select(0, rows) if torch.is_tensor(v) and v.dim() >= 1 else v for k, v in inputs.items()}
    mask = sub.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, -1] == 0).all()):
        width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        sub = {k: v[:, :width] if torch.is_tensor(v) and v.dim() == 2 and v.shape == mask.shape else v
               for k, v in sub.items()}  # fmt: skip
    return sub


@torch.no_grad()
def encoder_cascade(
    big: nn.Module, little: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    threshold: float, **extra: torch.Tensor,
) -> EncoderCascadeOutput:  # fmt: skip
    """Classify a batch with the little classifier; the rows whose confidence (max softmax probability) is not above
    `threshold` go, as one smaller batch, to the big classifier. threshold=1: the big one decides every row."""
    threshold = _check_threshold("threshold", threshold)
    if threshold is None:
        raise CascadeError("give threshold=: the little classifier's confidence at or below which the big one decides")
    check_classifier_pair(big, little)
    inputs = {"input_ids": input_ids, **extra}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    logits = _classifier_logits(little, inputs).float()  # [batch, labels]
    confidence = torch.softmax(logits, -1).max(-1).values
    unsure = confidence <= threshold
    if bool(unsure.any()):
        rows = unsure.nonzero().flatten()
        logits = logits.clone()
        logits[rows] = _classifier_logits(big, _sub_inputs(inputs, rows)).float()
    return EncoderCascadeOutput(logits.argmax(-1), logits, unsure, confidence)


@dataclasses.dataclass
class ClassifierRecords:
    """Both classifiers' logits on a dataset ([n, labels] each) and its labels [n] (or None): any threshold replays."""

    little: torch.Tensor
    big: torch.Tensor
    labels: torch.Tensor | None = None

    def predict(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions [n], big-decided [n] bool) of the cascade at `threshold` (what `encoder_cascade` gives)."""
        unsure = torch.softmax(self.little.float(), -1).max(-1).values <= threshold
        return torch.where(unsure, self.big.argmax(-1), self.little.argmax(-1)), unsure


@torch.no_grad()
def collect_classifier_records(
    big: nn.Module, little: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> ClassifierRecords:
    """Run both classifiers on `batches` (dicts with input_ids, attention_mask and optionally labels)."""
    check_classifier_pair(big, little)
    parts: dict[str, list[torch.Tensor]] = {"little": [], "big": [], "labels": []}
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        parts["little"].append(_classifier_logits(little, inputs).float())
        parts["big"].append(_classifier_logits(big, inputs).float())
        if "labels" in batch:
            parts["labels"].append(batch["labels"])
    labels = torch.cat(parts["labels"]) if parts["labels"] else None
    return ClassifierRecords(torch.cat(parts["little"]), torch.cat(parts["big"]), labels)


def calibrate_encoder_cascade(
    records: ClassifierRecords,
    *,
    delta: float = 0.01,
    epsilon: float = 0.05,
    risk: str = "accuracy_drop",
    grid: Sequence[float] | None = None,
) -> CascadeCalibration:
    """Learn-then-Test of the encoder cascade's threshold. risk "accuracy_drop": the share of samples the big model
    gets right and the cascade wrong (bounds the accuracy lost, as `depthprune.exits.calibrate`); "disagreement": the
    share whose prediction differs from the big model's. Exact binomial p-values (0/1 losses)."""
    if risk not in ENCODER_RISKS:
        raise CascadeError(f"unknown risk {risk!r}; choose one of {', '.join(ENCODER_RISKS)}")
    if risk == "accuracy_drop" and records.labels is None:
        raise CascadeError("risk='accuracy_drop' needs labels on the calibration data; or use risk='disagreement'")
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise CascadeError(f"delta and epsilon must lie in (0, 1); got delta={delta}, epsilon={epsilon}")
    reference = records.big.argmax(-1)

    def losses_of(t: float) -> torch.Tensor:
        pred, _ = records.predict(t)
        if risk == "accuracy_drop":
            return ((reference == records.labels) & (pred != records.labels)).float()
        return (pred != reference).float()

    def extra_of(t: float) -> dict[str, Any]:
        pred, unsure = records.predict(t)
        row = {"big_share": float(unsure.float().mean()), "agreement": float((pred == reference).float().mean())}
        if records.labels is not None:
            row["accuracy"] = float((pred == records.labels).float().mean())
        return row

    chosen, table = ltt_select(_grid(grid), losses_of, delta, epsilon, extra_of)
    name = "accuracy drop" if risk == "accuracy_drop" else "disagreement"
    return CascadeCalibration("encoder", "threshold", chosen, {}, delta, epsilon, len(reference), 0, table, name)


def rollback_distance(rollback: float) -> float:
    """BiLD's rollback threshold alpha_RB (a cross-entropy distance) that our probability threshold stands for."""
    return math.inf if rollback <= 0 else -math.log(rollback)


__all__ = [
    "BIG",
    "ENCODER_RISKS",
    "LITTLE",
    "MODES",
    "CascadeCalibration",
    "CascadeError",
    "CascadeOutput",
    "ClassifierRecords",
    "EncoderCascadeOutput",
    "calibrate_cascade",
    "calibrate_encoder_cascade",
    "cascade_continuations",
    "cascade_generate",
    "cascade_settings",
    "check_classifier_pair",
    "check_pair",
    "check_tokenizers",
    "collect_classifier_records",
    "encoder_cascade",
    "rollback_distance",
]
