"""Lossless self-speculative decoding, batched: a shallow draft made of the model's own layers proposes `draft_len`
tokens one at a time, one pass of the rest of the model verifies them all, and only what the full model itself would
produce is kept (greedy: token-identical to `model.generate(do_sample=False)`; sampling: the same distribution).

Two drafts:
- "exit" (LayerSkip, Elhoushi et al. 2024): layers 0..exit_layer and that layer's exit head. The verification runs
  only layers exit_layer+1..L-1 over the drafted positions, from the layer-exit_layer hidden states the draft already
  computed; the draft layers' keys/values stay in the cache. Both are exactly the full model's (layers 0..e never
  depend on the layers above them), so layers 0..exit_layer run once per token.
- "skip" (Draft & Verify, Zhang et al. 2024): the model without the layers in `skip_layers`, ending in the model's own
  final norm and LM head. Its keys/values and hidden states are exact only below the first skipped layer s: those are
  kept (layers 0..s-1 run once per token); the verification recomputes layers s..L-1 over the drafted positions and
  the draft's entries there are dropped first.

One round, all running rows in lockstep: the row's newest token d_0 (committed, not yet in the cache) sits at cache
column C. Draft steps feed d_0..d_k through the draft at columns C..C+k (d_k through the shared layers only, so the
verification sees column C+k and an all-accepted round yields a bonus token); the verification is one call of each
remaining layer over the k+1 columns, then the model's own final norm + LM head; `depthprune.generation.acceptance`
keeps the accepted drafts d_1..d_a and the verifier's next token. Every round yields a + 1 >= 1 tokens per row.

Batches whose rows accept different numbers of tokens: the cache stays rectangular (one column per fed position, the
same for every row), so the model's own mask and position code keep working. After a round, the columns that no row
keeps are cropped from every layer; a row that keeps fewer than the longest-keeping row has its rejected columns
masked out forever (zeros in the middle of its 2D attention mask). A model with sliding-window layers counts the
window in cache columns, so there the rejected columns are moved to the row's left instead
(`depthprune.kv.left_align`), where they act as left padding and the window covers the row's latest real tokens.
Position ids count each row's real (unmasked) columns, as transformers' generate derives them from the attention
mask, so rotary and learned position embeddings see the positions of plain decoding and masked columns are never
attended. With batch 1, nothing is ever masked.
Rows that end (end-of-sequence token or max_new_tokens) leave the batch: their cache rows are dropped.

Layers are always the model's own modules, each called with the arguments the model's own forward gives it
(`depthprune.runner.capture_stack`). The verification's arguments (mask and position embeddings of the k+1
columns) are captured before drafting, while every layer's cache still ends at column C: they do not depend on the
token ids, and each verifying layer then appends its k+1 columns to its own cache, as it would in a plain forward.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
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
from depthprune.exits.lm_heads import ExitHeadsLike, top_tokens
from depthprune.generation.acceptance import greedy_accept, sampling_probs, speculative_accept
from depthprune.kv import (
    check_cache,
    decoder_cache,
    grow_layer,
    has_sliding_layers,
    left_align,
    stack_rows,
    truncate_layer,
)
from depthprune.runner import StackCall, capture_stack

DRAFTS = ("exit", "skip")


@dataclasses.dataclass
class SpeculativeOutput:
    """sequences: [batch, prompt + new] token ids, prompt included and rows padded with pad_token_id after their
    end-of-sequence token, as `model.generate` returns them.

    Acceptance statistics (None with return_stats=False): drafted / accepted [batch]: draft tokens proposed to each
    row and accepted by the verifier; verifications [batch]: rounds the row took part in; round_accepted [batch,
    rounds]: accepted drafts per row and round, -1 once the row had ended. rounds: batched verification passes.
    wall_s: seconds of the whole call (prefill included). past_key_values / cache_mask (return_cache=True): the final
    cache, one row per input row, and the [batch, columns] mask of its real entries; row r's real entries are the
    keys/values of its real tokens but the last, in order (the last one was never fed to the model).
    """

    sequences: torch.Tensor
    draft: str
    exit_layer: int | None
    skip_layers: tuple[int, ...] | None
    draft_len: int
    rounds: int
    wall_s: float
    drafted: torch.Tensor | None = None
    accepted: torch.Tensor | None = None
    verifications: torch.Tensor | None = None
    round_accepted: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    cache_mask: torch.Tensor | None = None

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.drafted is None or self.accepted is None or self.verifications is None:
            raise ValueError("acceptance statistics were not recorded (return_stats=False)")
        return self.drafted, self.accepted, self.verifications

    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over all rows."""
        drafted, accepted, _ = self._stats()
        return float(accepted.sum()) / max(1, int(drafted.sum()))

    def mean_accepted(self) -> float:
        """Accepted draft tokens per verification (per row and round); each verification also yields one token of
        the verifier's own."""
        _, accepted, verifications = self._stats()
        return float(accepted.sum()) / max(1, int(verifications.sum()))

    def summary(self) -> dict[str, Any]:
        """Plain numbers for tables and JSON."""
        out: dict[str, Any] = {
            "draft": self.draft,
            "exit_layer": self.exit_layer,
            "skip_layers": list(self.skip_layers) if self.skip_layers is not None else None,
            "draft_len": self.draft_len,
            "rounds": self.rounds,
            "wall_s": self.wall_s,
        }
        if self.drafted is not None:
            out.update(
                drafted=int(self.drafted.sum()),
                accepted=int(self.accepted.sum()),
                acceptance_rate=self.acceptance_rate(),
                mean_accepted=self.mean_accepted(),
            )
        return out


@dataclasses.dataclass(frozen=True)
class _Draft:
    """Which layers the draft shares with the verifier (0..shared_end, exact) and how it ends."""

    kind: str
    shared_end: int  # last layer whose keys/values and output the verification reuses; -1: none
    tail: tuple[int, ...]  # "skip": the draft-only layers after shared_end (their entries are dropped before verify)
    exit_layer: int | None
    skip: frozenset[int]


def self_speculative_generate(
    model: nn.Module,
    heads: ExitHeadsLike | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit_layer: int | None = None,
    draft_len: int = 4,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    draft: str = "exit",
    skip_layers: Sequence[int] | None = None,
    return_stats: bool = True,
    return_cache: bool = False,
) -> SpeculativeOutput:
    """Self-speculative decoding of a decoder-only causal LM, lossless, batched (left-padded prompts).

    draft="exit": draft with layers 0..exit_layer and `heads.logits(exit_layer, .)`; draft="skip": draft with every
    layer but `skip_layers` (heads may be None). draft_len: tokens drafted per round (fewer near max_new_tokens).
    do_sample=False: token-identical to `model.generate(do_sample=False)`; do_sample=True: every token is distributed
    as sampling from the full model's softmax(logits / temperature) (after top_k filtering, if given), drawing from
    `generator`. eos_token_id / pad_token_id: as in `early_exit_generate` (None: the model's generation config; () to
    never stop early).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ValueError(f"draft_len must be an integer >= 1, got {draft_len!r}")
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    _, layers, final_logits = decoder_parts(model, "self-speculative decoding")
    num_layers = len(layers)
    plan = _plan(draft, heads, exit_layer, skip_layers, num_layers)

    mask = prompt_mask(input_ids, attention_mask)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    if not bool(mask[:, -1].all()):
        raise ValueError("self-speculative decoding needs left-padded prompts: every row's last position must be real")
    eos, pad = special_tokens(model, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=device)

    cache = decoder_cache(model, num_layers, "self-speculative decoding")
    contiguous = has_sliding_layers(model)  # a sliding window counts columns: keep each row's real ones together
    stats = _Stats(batch, device) if return_stats else None
    finished: dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {}
    out = input_ids.new_full((batch, max_new_tokens + draft_len + 1), pad)  # new tokens; room for a full round
    generated = torch.zeros(batch, dtype=torch.long, device=device)
    rounds = 0

    with torch.no_grad():
        start = wall_time(device)
        # The prompt but its last token runs through the full model; the last one is the first round's d_0, so even
        # the first new token is drafted and verified.
        if prompt_len > 1:
            positions = positions_from_mask(mask)
            model(**step_inputs(model, input_ids[:, :-1], mask[:, :-1], positions[:, :-1], cache, last_logits=True))
            check_cache(cache, num_layers)
        rows = torch.arange(batch, device=device)  # input row of each running row
        last = input_ids[:, -1]  # [n] d_0: committed, not yet in the cache
        cmask = mask[:, :-1]  # [n, C] real cache columns

        while rows.numel():
            n, columns = rows.numel(), cmask.shape[1]
            k = min(draft_len, max_new_tokens - int(generated[rows].min()) - 1)  # no row can keep more
            ext = torch.cat([cmask, cmask.new_ones((n, k + 1))], dim=1)  # [n, C + k + 1]
            pos = cmask.sum(-1, keepdim=True) + torch.arange(k + 1, device=device)  # [n, k + 1] position ids
            # the verification's layer arguments, captured while every cache layer still ends at column C
            _, verify_call = _capture(model, last[:, None].expand(n, k + 1), ext, pos, cache)

            drafts, q_probs, shared = [], [], []
            token = last
            for j in range(k + 1):
                h, call = _capture(model, token[:, None], ext[:, : columns + j + 1], pos[:, j : j + 1], cache)
                h = call.run(h, 0, plan.shared_end + 1)  # [n, 1, hidden]
                shared.append(h)
                if j == k:
                    break
                if plan.kind == "exit" and not do_sample:  # greedy: only the token (a truncated head skips full rows)
                    drafts.append(top_tokens(heads, plan.exit_layer, h)[:, -1].to(last.dtype))
                    token = drafts[-1]
                    continue
                if plan.kind == "exit":
                    logits = heads.logits(plan.exit_layer, h)[:, -1]  # [n, vocab]
                else:
                    h = call.run(h, order=plan.tail)
                    if 0 in plan.skip:  # the model sizes its mask from cache layer 0: keep it as long as the rest
                        grow_layer(cache.layers[0], columns + j + 1, like=cache.layers[plan.tail[0]].keys)
                    logits = final_logits(h)[:, -1]
                if do_sample:
                    q = sampling_probs(logits, temperature, top_k)
                    q_probs.append(q)
                    token = torch.multinomial(q, 1, generator=generator)[:, 0]
                else:
                    token = logits.argmax(-1)
                drafts.append(token.to(last.dtype))

            for i in range(plan.shared_end + 1, num_layers):  # drop the draft-only entries (and holes) above
                truncate_layer(cache.layers[i], columns)
            h = torch.cat(shared, dim=1)  # [n, k + 1, hidden] leaving layer shared_end at columns C..C+k
            h = verify_call.run(h, plan.shared_end + 1, num_layers)
            target = final_logits(h)  # [n, k + 1, vocab]
            d = torch.stack(drafts, dim=1) if drafts else last.new_zeros((n, 0))  # [n, k]
            if do_sample:
                p = sampling_probs(target, temperature, top_k)
                q = torch.stack(q_probs, dim=1) if q_probs else p[:, :0]
                accepted, nxt = speculative_accept(p, q, d, generator)
            else:
                accepted, nxt = greedy_accept(target, d)
            rounds += 1

            # commit d_1..d_a and the verifier's token, cut at the row's budget and at its end-of-sequence token
            idx = torch.arange(k + 1, device=device)
            nxt = nxt.to(d.dtype)[:, None]
            new = torch.where(idx < accepted[:, None], torch.cat([d, nxt], dim=1), nxt)  # [n, k + 1]
            budget = max_new_tokens - generated[rows]
            keep = torch.minimum(accepted + 1, budget)  # [n] tokens this round gives each row
            ended = keep == budget
            if eos:
                hit = torch.isin(new, eos_t) & (idx < keep[:, None])
                first = torch.where(hit, idx, k + 1).min(1).values
                ended |= hit.any(1)
                keep = torch.minimum(keep, first + 1)
            out[rows[:, None], generated[rows][:, None] + idx] = torch.where(idx < keep[:, None], new, pad)
            generated[rows] += keep
            if stats is not None:
                stats.add(rows, k, accepted)

            # cache: columns C..C+keep-1 of a row hold d_0..d_{keep-1}, all exact; crop what no row keeps, mask the rest
            longest = int(keep.max())
            for layer in cache.layers:
                truncate_layer(layer, columns + longest)
            cmask = torch.cat([cmask, (idx[:longest] < keep[:, None]).to(cmask.dtype)], dim=1)
            if contiguous:
                cmask = left_align(cache, cmask, longest - keep)
            last = new.gather(1, (keep - 1)[:, None])[:, 0]
            if bool(ended.any()):
                if return_cache:
                    for r in ended.nonzero().flatten().tolist():
                        kv = [(layer.keys[r], layer.values[r]) for layer in cache.layers]
                        finished[int(rows[r])] = (kv, cmask[r])
                stay = (~ended).nonzero().flatten()
                if stay.numel():
                    cache.batch_select_indices(stay)
                rows, last, cmask = rows[stay], last[stay], cmask[stay]
        wall = wall_time(device) - start

    new_len = int(generated.max())
    result = SpeculativeOutput(
        sequences=torch.cat([input_ids, out[:, :new_len]], dim=1),
        draft=plan.kind,
        exit_layer=plan.exit_layer,
        skip_layers=tuple(sorted(plan.skip)) if plan.kind == "skip" else None,
        draft_len=draft_len,
        rounds=rounds,
        wall_s=wall,
    )
    if stats is not None:
        result.drafted, result.accepted, result.verifications = stats.drafted, stats.accepted, stats.verifications
        result.round_accepted = torch.stack(stats.per_round, dim=1)
    if return_cache:
        result.past_key_values, result.cache_mask = stack_rows([finished[r] for r in range(batch)])
    return result


def _plan(
    draft: str, heads: ExitHeadsLike | None, exit_layer: int | None, skip_layers: Sequence[int] | None, num_layers: int
) -> _Draft:
    """Validate the draft's settings against the model; clear errors for everything that does not fit."""
    if draft not in DRAFTS:
        raise ValueError(f"unknown draft {draft!r}; choose one of {DRAFTS}")
    if draft == "exit":
        if skip_layers is not None:
            raise ValueError("skip_layers applies to draft='skip'; draft='exit' drafts with layers 0..exit_layer")
        if heads is None:
            raise ValueError("draft='exit' needs exit heads (e.g. DecoderExitHeads.logit_lens(model, [exit_layer]))")
        if exit_layer is None:
            raise ValueError("draft='exit' needs exit_layer: the 0-based decoder layer whose exit head drafts")
        if heads.num_layers != num_layers:
            raise ValueError(f"the exit heads were built for {heads.num_layers} layers, the model has {num_layers}")
        if not 0 <= exit_layer < num_layers - 1:
            raise ValueError(
                f"exit_layer {exit_layer} out of range: the draft must stop before the last layer, in "
                f"0..{num_layers - 2}"
            )
        if exit_layer not in {int(i) for i in heads.layers}:
            raise ValueError(
                f"no exit head after layer {exit_layer}: the heads have exits after layers {list(heads.layers)}"
            )
        return _Draft("exit", int(exit_layer), (), int(exit_layer), frozenset())
    if exit_layer is not None:
        raise ValueError("exit_layer applies to draft='exit'; draft='skip' drafts with every layer but skip_layers")
    skip = frozenset(int(i) for i in (skip_layers or ()))
    if not skip:
        raise ValueError("draft='skip' needs skip_layers: the decoder layers the draft leaves out")
    bad = sorted(i for i in skip if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"skip_layers {bad} out of range: the decoder has layers 0..{num_layers - 1}")
    if len(skip) == num_layers:
        raise ValueError("skip_layers leaves no layer for the draft; skip a proper subset of the layers")
    first = min(skip)
    tail = tuple(i for i in range(first, num_layers) if i not in skip)
    return _Draft("skip", first - 1, tail, None, skip)


def _capture(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
) -> tuple[torch.Tensor, StackCall]:
    """The model's own embedding, mask and position code for `ids` [n, s] at position ids `pos` [n, s], attending to
    the 2D `mask` [n, cache columns + s]; no layer runs."""
    return capture_stack(model, step_inputs(model, ids, mask, pos, cache))


class _Stats:
    def __init__(self, batch: int, device: torch.device) -> None:
        self.batch = batch
        self.drafted = torch.zeros(batch, dtype=torch.long, device=device)
        self.accepted = torch.zeros_like(self.drafted)
        self.verifications = torch.zeros_like(self.drafted)
        self.per_round: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor, k: int, accepted: torch.Tensor) -> None:
        self.drafted[rows] += k
        self.accepted[rows] += accepted
        self.verifications[rows] += 1
        this = torch.full_like(self.drafted, -1)
        this[rows] = accepted
        self.per_round.append(this)


# ---- choosing exit_layer and draft_len ------------------------------------------------------------------------------
@dataclasses.dataclass
class SpeculationChoice:
    """The fastest (exit_layer, draft_len) of a calibration run, and the whole table (one dict per candidate:
    exit_layer, draft_len, acceptance_rate, mean_accepted, tokens_per_s, speedup over plain greedy decoding timed in
    the same run)."""

    exit_layer: int
    draft_len: int
    tokens_per_s: float
    speedup: float
    baseline_tokens_per_s: float
    table: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_speculation(
    model: nn.Module,
    heads: ExitHeadsLike,
    prompts: torch.Tensor | Sequence[torch.Tensor],
    candidates_exit: Sequence[int] | None = None,
    candidates_draft_len: Sequence[int] = (1, 2, 3, 4, 6),
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    repeats: int = 1,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
) -> SpeculationChoice:
    """Pick exit_layer and draft_len for greedy draft="exit" decoding from a short calibration run.

    prompts: a left-padded [batch, seq] tensor (with `attention_mask`) or a list of 1-D token id tensors (left-padded
    here). Every candidate (default exit layers: all of `heads.layers`) and plain greedy `model.generate` decode the
    same prompts; each is timed `repeats` times (median), interleaved, after one warm-up run. The best is the highest
    wall-clock tokens/s. Timings are only comparable within one run on one machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    exits = list(heads.layers) if candidates_exit is None else [int(e) for e in candidates_exit]
    lens = [int(k) for k in candidates_draft_len]
    if not exits or not lens:
        raise ValueError("give at least one candidate exit layer and one candidate draft length")
    eos, pad = special_tokens(model, eos_token_id, pad_token_id)
    ids, mask = _as_batch(prompts, attention_mask, pad)
    configs = [(e, k) for e in exits for k in lens]
    num_layers = len(decoder_parts(model, "self-speculative decoding").layers)
    for e, k in configs:  # validate every candidate before timing anything
        _plan("exit", heads, e, None, num_layers)
        if k < 1:
            raise ValueError(f"draft lengths must be >= 1, got {k}")
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.eos_token_id, gen_config.pad_token_id = (eos or None), pad
    gen_config.do_sample = False
    gen_config.max_new_tokens = max_new_tokens

    def baseline() -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            start = wall_time(ids.device)
            seq = model.generate(ids, attention_mask=mask, generation_config=gen_config)
            return wall_time(ids.device) - start, seq

    def speculative(e: int, k: int) -> SpeculativeOutput:
        return self_speculative_generate(
            model,
            heads,
            ids,
            mask,
            exit_layer=e,
            draft_len=k,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )

    baseline()  # warm-up
    speculative(*configs[0])
    base_times: list[float] = []
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    last: dict[tuple[int, int], SpeculativeOutput] = {}
    for _ in range(repeats):
        seconds, seq = baseline()
        base_times.append(seconds)
        for c in configs:
            last[c] = speculative(*c)
            times[c].append(last[c].wall_s)
    new = seq[:, ids.shape[1] :]
    real = _real_new_tokens(new, eos)
    base_tps = real / statistics.median(base_times)
    table = []
    for (e, k), result in last.items():
        tps = _real_new_tokens(result.sequences[:, ids.shape[1] :], eos) / statistics.median(times[(e, k)])
        table.append(
            {
                "exit_layer": e,
                "draft_len": k,
                "acceptance_rate": result.acceptance_rate(),
                "mean_accepted": result.mean_accepted(),
                "tokens_per_s": tps,
                "speedup": tps / base_tps,
            }
        )
    best = max(table, key=lambda row: row["tokens_per_s"])
    return SpeculationChoice(
        exit_layer=best["exit_layer"],
        draft_len=best["draft_len"],
        tokens_per_s=best["tokens_per_s"],
        speedup=best["speedup"],
        baseline_tokens_per_s=base_tps,
        table=table,
    )


def _as_batch(
    prompts: torch.Tensor | Sequence[torch.Tensor], attention_mask: torch.Tensor | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask.to(prompts.device, torch.long)
        return prompts, mask
    if not prompts:
        raise ValueError("give at least one calibration prompt")
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - p.numel() :] = p.flatten()
        mask[r, width - p.numel() :] = 1
    return ids, mask


def _real_new_tokens(new: torch.Tensor, eos: list[int]) -> int:
    """New tokens up to and including each row's first end-of-sequence token."""
    if not eos:
        return int(new.numel())
    hit = torch.isin(new, torch.tensor(eos, device=new.device))
    after = torch.cumsum(hit.long(), 1) - hit.long() > 0
    return int((~after).sum())


__all__ = ["DRAFTS", "SpeculationChoice", "SpeculativeOutput", "choose_speculation", "self_speculative_generate"]
