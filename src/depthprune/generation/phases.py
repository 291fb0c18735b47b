"""Different depths per generation phase: the prompt (prefill) and the generated tokens (decode) run different static
layer plans of one decoder-only model.

A phase plan is a subset of the decoder's layers, in order, each once (`depthprune.plan.LayerPlan`: '0-19,22,24-29').
Both phases run the model's own layers with the arguments its own forward gives them (`runner.capture_stack`); the
cache is one full-length layer per source layer (`kv.decoder_cache`), kept rectangular with holes (`kv.grow_cache`)
for the layers a phase skips, so the model's own mask and position code keep working.

- deep prefill / shallow decode (the decode plan's layers all ran in the prefill): generated tokens run the decode
  plan and read the prompt's entries of exactly those layers; the layers they skip get holes, never read.
- shallow prefill / deep decode (the decode plan runs layers the prefill skipped): the prompt positions owe those
  layers keys/values, by one of two strategies (`kv=`), the prompt-block forms of `depthprune.kv`'s two:
  * "propagate" (default; CALM's state propagation, `kv.propagate_block`): each missing layer's keys/values are the
    layer's own projections of the last state the prefill computed below it (the prompt's final state for layers
    above its last one), stopped before attention: a K/V projection per missing layer, so the prefill's saving is
    kept; approximate.
  * "recompute" (EE-LLM's deferred recomputation): from the first decode-plan layer the prefill skipped, the prefill's
    own layers write into a scratch cache and the prompt's state there is held; before the first generated token runs,
    the held state is run through the rest of the decode plan, filling the cache with exactly what the decode plan
    computes on the prompt (with a full decode plan: the untouched model's cache). Exact, but the prompt then costs
    more than a full prefill: only the time to the first token is saved. Hence the default is "propagate".
- identity plans in both phases: token-identical to `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from depthprune import decoding
from depthprune.errors import PlanError
from depthprune.kv import check_cache, decoder_cache, grow_cache, propagate_block
from depthprune.plan import LayerPlan
from depthprune.runner import StackCall, capture_stack

PROMPT_KV = ("propagate", "recompute")
"""How a deep decode gets the prompt's entries in layers a shallow prefill skipped (the module docstring)."""
DEFAULT_KV = "propagate"

PlanLike = LayerPlan | str | Sequence[int] | None


@dataclasses.dataclass(frozen=True)
class PhasePlans:
    """The decoder layers (source indices, ascending) each phase runs, and the strategy for the prompt's entries in
    decode layers the prefill skipped."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    num_layers: int
    kv: str = DEFAULT_KV

    @property
    def missing(self) -> tuple[int, ...]:
        """Decode layers the prefill skipped: the prompt positions owe them keys/values."""
        ran = set(self.prefill)
        return tuple(i for i in self.decode if i not in ran)

    def to_dict(self) -> dict:
        return {
            "prefill": LayerPlan({"decoder": self.prefill}).to_text().partition("=")[2],
            "decode": LayerPlan({"decoder": self.decode}).to_text().partition("=")[2],
            "num_layers": self.num_layers,
            "kv": self.kv,
        }


def phase_plans(num_layers: int, decode: PlanLike = None, prefill: PlanLike = None, kv: str = DEFAULT_KV) -> PhasePlans:
    """Check both plans against a decoder of `num_layers` layers (None: every layer) and the strategy; clear errors."""
    if kv not in PROMPT_KV:
        raise ValueError(f"unknown kv strategy {kv!r} for phase generation; choose one of {', '.join(PROMPT_KV)}")
    plans = PhasePlans(_layers(prefill, num_layers, "prefill"), _layers(decode, num_layers, "decode"), num_layers, kv)
    if kv == "recompute" and plans.missing:
        k = plans.decode.index(plans.missing[0])
        if plans.prefill[:k] != plans.decode[:k]:
            raise ValueError(
                f"kv='recompute' resumes the prompt from the layers both plans share before the first decode layer "
                f"the prefill skips ({plans.missing[0]}); the prefill plan runs {list(plans.prefill[:k])} there, the "
                f"decode plan {list(plans.decode[:k])}: use kv='propagate'"
            )
    return plans


def _layers(plan: PlanLike, n: int, phase: str) -> tuple[int, ...]:
    if plan is None:
        return tuple(range(n))
    if not isinstance(plan, LayerPlan):
        if isinstance(plan, str):
            plan = LayerPlan.parse(plan)
        else:
            plan = LayerPlan({"decoder": tuple(plan)})
    try:
        layers = plan.resolve({"decoder": n}).stacks["decoder"]
    except PlanError as err:
        raise PlanError(f"--{phase}-plan: {err}") from None
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise PlanError(
            f"the {phase} plan {plan.to_text()} repeats or reorders layers; a phase plan runs a subset of the layers "
            "in order, each once (apply a reordering statically: depthprune.static.apply)"
        )
    return tuple(layers)


class PhaseRunner:
    """One decoder with a prefill plan and a decode plan over one cache (built per batch of prompts).

    `prefill(ids, mask, positions)` -> logits of the prompts' last position [batch, vocab]; then `decode(tokens,
    mask, positions)` (tokens [batch, s], the mask over the cache columns and these tokens) -> logits [batch, s,
    vocab] of the decode plan, any number of times (s = 1 in generation, the whole continuation teacher-forced)."""

    def __init__(self, model: nn.Module, plans: PhasePlans) -> None:
        self.model, self.plans = model, plans
        self.adapter, layers, self.final_logits = decoding.decoder_parts(model, "phase generation")
        if len(layers) != plans.num_layers:
            raise ValueError(f"the phase plans were checked for {plans.num_layers} layers, the model has {len(layers)}")
        self.cache = decoder_cache(model, plans.num_layers, "phase generation")
        self._held: tuple[torch.Tensor, StackCall, tuple[int, ...]] | None = None  # kv="recompute", until decode
        self.length = 0  # cache columns

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model, plans, cache = self.model, self.plans, self.cache
        inputs = decoding.step_inputs(model, ids, mask, positions, cache, last_logits=True)
        self.length = ids.shape[1]
        if plans.prefill == tuple(range(plans.num_layers)):  # the model's own forward, as generate runs it
            logits = model(**inputs).logits[:, -1]
            check_cache(cache, plans.num_layers)
            return logits
        hidden, call = capture_stack(model, inputs, adapter=self.adapter)  # [batch, prompt, hidden]
        missing = plans.missing
        if missing and plans.kv == "recompute":
            k = plans.decode.index(missing[0])  # the plans share prefill[:k]; the rest goes to a scratch cache
            held = call.run(hidden, order=plans.prefill[:k])
            self._held = (held, call, plans.decode[k:])
            h = call.run(held, order=plans.prefill[k:], cache=decoder_cache(model, plans.num_layers))
        else:
            h, todo = hidden, list(missing)
            for layer in plans.prefill:
                while todo and todo[0] < layer:  # missing layers below this one: from the state entering it
                    propagate_block(call, todo.pop(0), cache, h)
                h = call.run(h, order=(layer,))
            for layer in todo:  # above the prefill's last layer: from its final state (CALM)
                propagate_block(call, layer, cache, h)
            grow_cache(cache, self.length, ids.shape[0])  # layers neither phase runs: holes
        return self.final_logits(h[:, -1:])[:, -1]

    def _fill(self) -> None:
        """kv="recompute": run the held prompt state through the rest of the decode plan, appending its entries."""
        if self._held is None:
            return
        held, call, rest = self._held
        self._held = None
        call.run(held, order=rest)  # the prompt's own calls: their cache is this runner's
        grow_cache(self.cache, self.length, held.shape[0])

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._fill()
        inputs = decoding.step_inputs(self.model, tokens, mask, positions, self.cache)
        hidden, call = capture_stack(self.model, inputs, adapter=self.adapter)  # [batch, s, hidden]
        h = call.run(hidden, order=self.plans.decode)
        self.length += tokens.shape[1]
        grow_cache(self.cache, self.length, tokens.shape[0])  # layers the decode plan skips: holes, never read
        return self.final_logits(h)


@dataclasses.dataclass
class PhaseOutput:
    """sequences [batch, prompt + new] (as model.generate returns them); first_token_s: seconds to the first new
    token (the prefill) and decode_s: seconds of each later token, when timing=True."""

    sequences: torch.Tensor
    plans: PhasePlans
    first_token_s: float | None = None
    decode_s: list[float] | None = None


def phase_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    decode_plan: PlanLike = None,
    prefill_plan: PlanLike = None,
    kv: str = DEFAULT_KV,
    max_new_tokens: int,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    timing: bool = False,
) -> PhaseOutput:
    """Greedy decoding where the prompt runs `prefill_plan` and each generated token `decode_plan` (None: every
    layer). Left-padded batches: positions from the mask as generate derives them; rows that ended get the pad token.
    eos_token_id: None takes the model's generation config; () never stops early."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    plans = phase_plans(len(decoding.decoder_parts(model, "phase generation").layers), decode_plan, prefill_plan, kv)
    runner = PhaseRunner(model, plans)
    mask = decoding.prompt_mask(input_ids, attention_mask)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos, pad = decoding.special_tokens(model, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    positions = decoding.positions_from_mask(mask)
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new_tokens), pad)], dim=1)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    times: list[float] = []
    with torch.no_grad():
        start = decoding.wall_time(device, sync=timing)
        token = runner.prefill(input_ids, mask, positions).argmax(-1)
        for step in range(max_new_tokens):
            token = torch.where(active, token, torch.full_like(token, pad))
            sequences[:, prompt_len + step] = token
            if eos:
                active = active & ~torch.isin(token, eos_t)
            if timing:
                now = decoding.wall_time(device)
                times.append(now - start)
                start = now
            if step + 1 == max_new_tokens or not bool(active.any()):
                sequences = sequences[:, : prompt_len + step + 1]
                break
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            next_pos = positions[:, -1:] + 1  # [batch, 1]
            positions = torch.cat([positions, next_pos], dim=1)
            token = runner.decode(token[:, None], mask, next_pos)[:, -1].argmax(-1)
    return PhaseOutput(sequences, plans, times[0] if timing else None, times[1:] if timing else None)


@torch.no_grad()
def phase_logits(
    model: nn.Module,
    prompts: torch.Tensor,
    continuations: torch.Tensor,
    *,
    decode_plan: PlanLike = None,
    prefill_plan: PlanLike = None,
    kv: str = DEFAULT_KV,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher forcing across the phases: logits [batch, C, vocab] predicting `continuations` [batch, C] after
    `prompts` [batch, P] (attention_mask: the prompts' mask). The first comes from the prompt's last position under
    the prefill plan, the others from the decode plan reading that cache, as `phase_generate` computes them."""
    if continuations.dim() != 2 or continuations.shape[0] != prompts.shape[0] or continuations.shape[1] < 1:
        raise ValueError(
            f"continuations must be [batch, C >= 1] beside prompts {tuple(prompts.shape)}, got "
            f"{tuple(continuations.shape)}"
        )
    plans = phase_plans(len(decoding.decoder_parts(model, "phase generation").layers), decode_plan, prefill_plan, kv)
    runner = PhaseRunner(model, plans)
    mask = decoding.prompt_mask(prompts, attention_mask)
    positions = decoding.positions_from_mask(mask)
    first = runner.prefill(prompts, mask, positions)[:, None]  # [batch, 1, vocab]
    rest = continuations[:, :-1]
    if not rest.shape[1]:
        return first
    mask = torch.cat([mask, mask.new_ones(rest.shape)], dim=1)
    steps = positions[:, -1:] + torch.arange(1, rest.shape[1] + 1, device=positions.device)
    return torch.cat([first, runner.decode(rest, mask, steps)], dim=1)


__all__ = [
    "DEFAULT_KV",
    "PROMPT_KV",
    "PhaseOutput",
    "PhasePlans",
    "PhaseRunner",
    "phase_generate",
    "phase_logits",
    "phase_plans",
]
