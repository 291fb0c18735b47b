"""SkipDecode (Del Corro et al. 2023): batched greedy decoding with a KV cache where every generated position runs a
fixed number of decoder layers, shared by the whole batch and non-increasing with the position.

A position that runs n of the L layers runs the TOP n (layers L-n .. L-1): the state leaving the model's own embedding
goes straight into layer L-n. Because the number of layers never increases along the sequence, every layer a later
token runs was also run by every earlier token (the prompt runs all L layers), so its keys/values there are real and
nothing is ever recomputed. The skipped lower layers of a position still get a cache entry (zeros), so the cache stays
rectangular for the model's own mask and position code; no later position ever runs those layers, so the entries are
never read (the tests fill them with NaN and get the same, finite output).

Layers are the model's own modules, each called with the arguments the model's own forward gives it
(`depthprune.runner.capture_stack`); the last one is followed by the model's own final step (final norm, LM head,
logit soft-capping).

- `SkipSchedule`: SkipDecode's linear decay of the layer count from max_layers to min_layers over decay_tokens
  generated positions (then min_layers), or a constant count; `SkipSchedule.for_speedup` aims at a mean speed-up.
- `default_floor`: the depth floor the command line keeps by default (a quarter of the layers).
- `StepCost` / `measure_step_cost`: the measured seconds of one generated token as fixed + per-layer cost (the
  embedding, the head and the loop do not shrink with the layer count), so a schedule can aim at a measured speed-up.
- `skipdecode_generate`: decoding (prompt at full depth).
- `skipdecode_logits`: the same computation over a whole sequence in one pass (teacher forcing), for perplexity and
  training (`depthprune.generation.skipdecode_train`); equal to the decoding path.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from depthprune.decoding import (
    DecoderParts,
    decoder_parts,
    mask_arg,
    positions_from_mask,
    prompt_mask,
    special_tokens,
    step_inputs,
    wall_time,
)
from depthprune.kv import append_holes, check_cache, check_decoder, decoder_cache
from depthprune.runner import capture_stack


def default_floor(num_layers: int) -> int:
    """The depth floor a SkipDecode schedule keeps by default on the command line: a quarter of the layers (8 of
    SmolLM2's 30, which halved the adapted perplexity against schedules ending at one layer: RESULTS.md 4c)."""
    return max(1, math.ceil(num_layers / 4))


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Measured seconds of one generated token of `skipdecode_generate` running `layers` layers:
    fixed_s + per_layer_s * layers (fixed: embedding, final norm + LM head, the loop's own work), at `batch_size`."""

    fixed_s: float
    per_layer_s: float
    num_layers: int
    batch_size: int

    def __post_init__(self) -> None:
        if not self.per_layer_s > 0 or not self.fixed_s >= 0:
            raise ValueError(
                f"a step cost needs per_layer_s > 0 and fixed_s >= 0, got {self.per_layer_s}, {self.fixed_s} (a "
                "measurement this noisy cannot steer a schedule: measure again on a quieter machine with more "
                "repeats, or aim at the nominal layer ratio)"
            )

    def seconds(self, layers: float) -> float:
        return self.fixed_s + self.per_layer_s * layers

    def speedup(self, mean_layers: float) -> float:
        """Measured speed-up over the full depth of a schedule running `mean_layers` layers per token on average."""
        return self.seconds(self.num_layers) / self.seconds(mean_layers)

    def mean_layers_for(self, speedup: float) -> float:
        """The mean layers per generated token at which decoding runs `speedup` times faster than at full depth
        (below 0 when the fixed cost alone is more than 1/speedup of a full step: no schedule gets there)."""
        return (self.seconds(self.num_layers) / speedup - self.fixed_s) / self.per_layer_s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_step_cost(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    new_tokens: int = 8,
    repeats: int = 5,
    low_layers: int | None = None,
) -> StepCost:
    """Time `skipdecode_generate` at two constant depths (all layers and `low_layers`, default the depth floor) on
    these prompts: each call's decode seconds (a call with `new_tokens` + 1 tokens minus one with 1 token, the
    prompt's) per generated token, the median of `repeats` interleaved rounds after a warm-up; a line through the
    two gives the fixed and per-layer cost. What `generate --skipdecode SPEEDUP` aims with by default."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens}, {repeats}")
    num_layers = len(skipdecode_parts(model).layers)
    low = default_floor(num_layers) if low_layers is None else low_layers
    if not 1 <= low < num_layers:
        raise ValueError(f"low_layers must lie in 1..{num_layers - 1} (below the full depth), got {low}")
    device = input_ids.device

    def seconds(layers: int, n: int) -> float:
        start = wall_time(device)
        skipdecode_generate(
            model, input_ids, attention_mask, schedule=SkipSchedule.constant(num_layers, layers), max_new_tokens=n,
            eos_token_id=(),
        )  # fmt: skip
        return wall_time(device) - start

    for layers in (num_layers, low):  # warm-up: the first call of each path is slow
        seconds(layers, 2)
    per_token: dict[int, list[float]] = {num_layers: [], low: []}
    for r in range(repeats):
        for layers in (num_layers, low) if r % 2 == 0 else (low, num_layers):
            whole, prompt = seconds(layers, new_tokens + 1), seconds(layers, 1)
            per_token[layers].append((whole - prompt) / new_tokens)
    high_s, low_s = (statistics.median(per_token[n]) for n in (num_layers, low))
    per_layer = (high_s - low_s) / (num_layers - low)
    return StepCost(max(0.0, high_s - per_layer * num_layers), per_layer, num_layers, int(input_ids.shape[0]))


def floored_schedule(
    num_layers: int,
    target_speedup: float,
    *,
    budget: int,
    min_layers: int | None = None,
    max_layers: int | None = None,
    cost: StepCost | None = None,
) -> SkipSchedule:
    """`SkipSchedule.for_speedup` with a depth floor: `min_layers`, by default `default_floor` (a quarter of the
    layers). A target whose mean depth lies under the floor is refused with the largest speed-up the floor allows and
    the `min_layers` that would reach it. What `generate --skipdecode` and `train-skipdecode` build.

    cost: a measured `StepCost`: the schedule then aims at `target_speedup` in measured seconds per token (its mean
    depth is `cost.mean_layers_for(target_speedup)`), not at the layer ratio num_layers / mean layers."""
    if not 1.0 <= target_speedup <= num_layers:
        raise ValueError(
            f"speed-up {target_speedup:g} out of range: a {num_layers}-layer model can aim at 1..{num_layers}x"
        )
    if cost is not None and cost.num_layers != num_layers:
        raise ValueError(f"the step cost was measured on {cost.num_layers} layers, the schedule has {num_layers}")
    floor = default_floor(num_layers) if min_layers is None else min_layers
    mean = num_layers / target_speedup if cost is None else cost.mean_layers_for(target_speedup)
    if mean < floor:
        default = " (the default: a quarter of the depth)" if min_layers is None else ""
        ceiling = num_layers / floor if cost is None else cost.speedup(floor)
        measured = "" if cost is None else " measured"
        raise ValueError(
            f"a{measured} speed-up of {target_speedup:g} means {mean:.3g} layers per generated token on average, "
            f"below the depth floor of {floor} layers{default}; aim lower (at most {ceiling:.3g}x{measured}) or pass "
            f"min_layers={max(1, math.floor(mean + 1e-9))}"
            + (
                ""
                if cost is None or mean >= 1
                else f" (the fixed cost per token, {cost.fixed_s * 1e3:.3g} ms of a "
                f"{cost.seconds(num_layers) * 1e3:.3g} ms full step, leaves no depth that fast)"
            )
        )
    return SkipSchedule.for_speedup(
        num_layers, num_layers / mean, budget=budget, min_layers=floor, max_layers=max_layers
    )


@dataclasses.dataclass(frozen=True)
class SkipSchedule:
    """How many decoder layers the generated token at index k (0-based, its position is prompt_len + k) runs.

    layers_at(k) = max_layers - round((max_layers - min_layers) * k / decay_tokens) for k < decay_tokens, then
    min_layers: a linear decay, non-increasing in k. decay_tokens may be fractional (`for_speedup` tunes it finely).
    max_layers == min_layers is a constant schedule (decay_tokens is then ignored and stored as 0). The prompt always
    runs all num_layers layers.
    """

    num_layers: int
    max_layers: int
    min_layers: int
    decay_tokens: float = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "max_layers", "min_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SkipSchedule.{name} must be an int, got {value!r}")
        decay = self.decay_tokens
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay):
            raise TypeError(f"SkipSchedule.decay_tokens must be a finite number, got {decay!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not 1 <= self.min_layers <= self.max_layers <= self.num_layers:
            raise ValueError(
                f"a skip schedule needs 1 <= min_layers <= max_layers <= num_layers, got min_layers={self.min_layers}, "
                f"max_layers={self.max_layers}, num_layers={self.num_layers} (layers count from the top: n layers "
                "means layers num_layers-n .. num_layers-1 run)"
            )
        if self.max_layers == self.min_layers:
            object.__setattr__(self, "decay_tokens", 0)
        elif not self.decay_tokens > 0:
            raise ValueError(
                f"a decaying schedule ({self.max_layers} -> {self.min_layers} layers) needs decay_tokens > 0, "
                f"got {self.decay_tokens}"
            )

    # ---- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def constant(cls, num_layers: int, layers: int) -> SkipSchedule:
        """Every generated token runs the top `layers` layers."""
        return cls(num_layers, layers, layers, 0)

    @classmethod
    def linear(cls, num_layers: int, max_layers: int, min_layers: int, decay_tokens: float) -> SkipSchedule:
        """SkipDecode's linear decay from max_layers (first generated token) to min_layers (after decay_tokens)."""
        return cls(num_layers, max_layers, min_layers, decay_tokens)

    @classmethod
    def for_speedup(
        cls,
        num_layers: int,
        target_speedup: float,
        *,
        budget: int = 128,
        max_layers: int | None = None,
        min_layers: int | None = None,
    ) -> SkipSchedule:
        """A linear decay whose mean layers per generated token over the first `budget` tokens is as close as the
        integers allow to num_layers / target_speedup (e.g. 2, 3, 5).

        By default the decay is centred on the target mean m (max + min ~ 2m, as a ramp ending at the budget would
        be): max_layers = min(num_layers, floor(2m - 1)) (at least ceil(m)) and min_layers = floor(2m - max) (at least
        1, at most floor(m)); decay_tokens is then searched so that the mean hits m. Either end can be given instead.
        """
        if budget < 1:
            raise ValueError(f"budget must be >= 1 generated token, got {budget}")
        if not 1.0 <= target_speedup <= num_layers:
            raise ValueError(
                f"target_speedup must lie in [1, {num_layers}] for a {num_layers}-layer model (every token runs at "
                f"least one layer), got {target_speedup}"
            )
        m = num_layers / target_speedup
        hi = max_layers
        lo = min_layers
        if hi is None and lo is None:
            hi = max(math.ceil(m - 1e-9), min(num_layers, math.floor(2 * m - 1 + 1e-9)))
        if hi is None:
            hi = min(num_layers, max(math.ceil(m - 1e-9), math.ceil(2 * m - lo - 1e-9)))
        if lo is None:
            lo = min(max(1, math.floor(2 * m - hi + 1e-9)), max(1, math.floor(m + 1e-9)))
        if not lo - 1e-9 <= m <= hi + 1e-9:
            raise ValueError(
                f"a mean of {m:.3g} layers per token ({target_speedup}x of {num_layers}) cannot come from a decay "
                f"between max_layers={hi} and min_layers={lo}"
            )
        cls(num_layers, hi, lo, 1)  # range checks with the usual message
        if abs(m - lo) < 1e-9:
            return cls.constant(num_layers, lo)
        if abs(m - hi) < 1e-9:
            return cls.constant(num_layers, hi)

        def mean(decay: float) -> float:
            return cls(num_layers, hi, lo, decay).mean_layers(budget)

        # mean(decay) grows with decay (each token's count does), from about lo towards hi: bisect for m. A fractional
        # decay length moves the rounding thresholds one token at a time, so the mean can come within ~1/budget.
        low, high = 0.0, 1.0
        while mean(high) < m and high < 2.0**40:
            low, high = high, high * 2
        for _ in range(80):
            mid = (low + high) / 2
            if mean(mid) < m:
                low = mid
            else:
                high = mid
        candidates = [d for d in (round(low, 6), round(high, 6), high) if d > 0]
        best = min(candidates, key=lambda d: abs(mean(d) - m))
        return cls(num_layers, hi, lo, best)

    # ---- queries ----------------------------------------------------------------------------------------------------
    def layers_at(self, k: int) -> int:
        """Decoder layers run by generated token k (0-based): the top layers_at(k) ones."""
        if k < 0:
            raise ValueError(f"generated token index must be >= 0, got {k}")
        if self.decay_tokens == 0 or k >= self.decay_tokens:
            return self.min_layers
        return self.max_layers - math.floor((self.max_layers - self.min_layers) * k / self.decay_tokens + 0.5)

    def steps(self, n: int) -> list[int]:
        """layers_at(k) for k = 0 .. n-1."""
        return [self.layers_at(k) for k in range(n)]

    def mean_layers(self, n: int) -> float:
        """Mean layers per generated token over the first n generated tokens."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return sum(self.steps(n)) / n

    def speedup(self, n: int) -> float:
        """num_layers / mean_layers(n): the ideal decoder-layer speed-up over n generated tokens."""
        return self.num_layers / self.mean_layers(n)

    def for_sequence(self, prompt_len: int, seq_len: int) -> list[int]:
        """Layers per position of a sequence of seq_len tokens whose first prompt_len are the prompt (full depth)."""
        if not 0 <= prompt_len <= seq_len:
            raise ValueError(f"need 0 <= prompt_len <= seq_len, got {prompt_len}, {seq_len}")
        return [self.num_layers] * prompt_len + self.steps(seq_len - prompt_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipSchedule:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class SkipDecodeOutput:
    """sequences: [batch, prompt + new] token ids, prompt included, rows padded with pad_token_id after their
    end-of-sequence token (as `model.generate` returns them).
    layers: [batch, new] decoder layers run to compute each generated token: num_layers for the first (the prompt's
    last position), the schedule's count of the position that produced it for the others, 0 for padding after the
    end of a sequence. logits: [batch, new, vocab] the logits each token was chosen from, when asked for.
    past_key_values: the DynamicCache after the last step, when asked for (every layer holds every position fed to
    the model; the entries of skipped layers hold `hole_value`).
    """

    sequences: torch.Tensor
    layers: torch.Tensor
    num_layers: int
    logits: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None

    def mean_layers(self) -> float:
        """Mean decoder layers per generated token (padding after end of sequence excluded)."""
        real = self.layers[self.layers > 0]
        return float(real.float().mean()) if real.numel() else float("nan")

    def speedup(self) -> float:
        """num_layers / mean_layers(): the ideal decoder-layer speed-up of this run over the full model."""
        return self.num_layers / self.mean_layers()


def _step_layers(schedule: SkipSchedule | Sequence[int], num_layers: int) -> Callable[[int], int]:
    """k -> layers of generated token k, from a SkipSchedule or an explicit list (its last value repeats)."""
    if isinstance(schedule, SkipSchedule):
        if schedule.num_layers != num_layers:
            raise ValueError(f"the schedule was built for {schedule.num_layers} layers, the model has {num_layers}")
        return schedule.layers_at
    if isinstance(schedule, torch.Tensor):
        schedule = schedule.flatten().tolist()
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not len(schedule):
        raise TypeError(
            f"schedule must be a SkipSchedule or a non-empty list of layer counts per generated token, got {schedule!r}"
        )
    steps = [int(n) for n in schedule]
    _check_counts(torch.tensor([steps]), num_layers)
    return lambda k: steps[min(k, len(steps) - 1)]


def _check_counts(depth: torch.Tensor, num_layers: int) -> None:
    """depth [batch, seq]: layer counts per position; raise unless each is in 1..num_layers and non-increasing."""
    if depth.numel() == 0:
        return
    low, high = int(depth.min()), int(depth.max())
    if low < 1 or high > num_layers:
        raise ValueError(
            f"layer counts must lie in 1..{num_layers} (the number of top layers a position runs), got values "
            f"from {low} to {high}"
        )
    rises = depth[:, 1:] > depth[:, :-1]
    if bool(rises.any()):
        row, pos = (int(i) for i in rises.nonzero()[0])
        raise ValueError(
            f"a SkipDecode schedule must be non-increasing along the sequence (a position may not run a layer an "
            f"earlier one skipped: its cache entry there is empty); row {row} goes from {int(depth[row, pos])} to "
            f"{int(depth[row, pos + 1])} layers at position {pos + 1}"
        )


def skipdecode_parts(model: nn.Module) -> DecoderParts:
    """(adapter, decoder layers, hidden [b, s, h] -> logits [b, s, vocab] by the model's own final step) of a
    decoder-only LM whose layers SkipDecode can run (full or sliding-window attention), or a clear error."""
    parts = decoder_parts(model, "SkipDecode")
    check_decoder(model, "SkipDecode")
    return parts


def skipdecode_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    schedule: SkipSchedule | Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    return_logits: bool = False,
    return_cache: bool = False,
    hole_value: float = 0.0,
) -> SkipDecodeOutput:
    """Greedy SkipDecode of a decoder-only causal LM, batched (left-padded prompts), with a DynamicCache.

    The prompt runs the full model and gives the first new token; generated token k is then fed at position
    prompt_len + k and runs the top `schedule.layers_at(k)` layers (a list gives the counts per generated token, its
    last value repeating), all rows alike. A constant full-depth schedule is token-identical to
    `model.generate(do_sample=False)`. eos_token_id / pad_token_id: as in `early_exit_generate` (None: the model's
    generation config; () never stops early); finished rows keep being fed pad tokens, as `generate` does.
    hole_value: what the skipped layers' cache entries hold (never read; tests pass NaN to prove it).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    adapter, layers, final_logits = skipdecode_parts(model)
    num_layers = len(layers)
    layers_at = _step_layers(schedule, num_layers)
    mask = prompt_mask(input_ids, attention_mask)
    positions = positions_from_mask(mask)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos, pad = special_tokens(model, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=device)

    cache = decoder_cache(model, num_layers, "SkipDecode")
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new_tokens), pad)], dim=1)
    used = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    scores: list[torch.Tensor] = []
    active = torch.ones(batch, dtype=torch.bool, device=device)
    deepest = num_layers  # fewest layers any earlier position ran: no later position may run more

    with torch.no_grad():
        out = model(**step_inputs(model, input_ids, mask, positions, cache, last_logits=True))
        check_cache(cache, num_layers)
        logits = out.logits[:, -1]  # [batch, vocab]
        ran = num_layers
        for k in range(max_new_tokens):
            if return_logits:
                scores.append(logits)
            token = torch.where(active, logits.argmax(-1).to(input_ids.dtype), torch.full_like(input_ids[:, 0], pad))
            sequences[:, prompt_len + k] = token
            used[:, k] = torch.where(active, ran, 0)
            if eos:
                active = active & ~torch.isin(token, eos_t)
            if k + 1 == max_new_tokens or not bool(active.any()):
                sequences, used = sequences[:, : prompt_len + k + 1], used[:, : k + 1]
                break
            ran = layers_at(k)
            if ran > deepest:
                raise RuntimeError(f"schedule rose from {deepest} to {ran} layers at generated token {k}")
            deepest = ran
            position = prompt_len + k
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            inputs = step_inputs(model, token[:, None], mask, positions[:, -1:], cache)
            hidden, call = capture_stack(model, inputs, adapter=adapter)  # [batch, 1, hidden] embedded
            hidden = call.run(hidden, num_layers - ran, num_layers)  # the top `ran` layers, each appending its entry
            append_holes(cache, num_layers - ran, position, hole_value)
            logits = final_logits(hidden)[:, -1]

    return SkipDecodeOutput(
        sequences=sequences,
        layers=used,
        num_layers=num_layers,
        logits=torch.stack(scores, dim=1) if return_logits else None,
        past_key_values=cache if return_cache else None,
    )


def _depth_per_position(
    per_position: SkipSchedule | Sequence[int] | torch.Tensor, shape: torch.Size, num_layers: int, device: torch.device
) -> torch.Tensor:
    """Layer counts [batch, seq] from a list / [seq] / [batch, seq] tensor, validated."""
    if isinstance(per_position, SkipSchedule):
        raise TypeError(
            "skipdecode_logits takes layer counts per position; for a prompt of p tokens pass "
            "schedule.for_sequence(p, seq_len)"
        )
    depth = torch.as_tensor(per_position, device=device)
    if depth.is_floating_point() or depth.dtype == torch.bool:
        raise TypeError(f"layer counts must be integers, got {depth.dtype}")
    depth = depth.long()
    if depth.dim() == 1:
        depth = depth[None].expand(shape[0], -1)
    if tuple(depth.shape) != tuple(shape):
        raise ValueError(
            f"layer counts per position must be [seq] or [batch, seq] = {tuple(shape)}, got {tuple(depth.shape)}"
        )
    _check_counts(depth, num_layers)
    return depth


def skipdecode_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    schedule_per_position: Sequence[int] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] of `input_ids` [batch, seq] when position p runs the top n[p] decoder layers, in one
    pass (teacher forcing): what `skipdecode_generate` computes token by token, for perplexity and training.

    schedule_per_position: layer counts [seq] (all rows) or [batch, seq], each in 1..num_layers, non-increasing along
    the sequence (e.g. `schedule.for_sequence(prompt_len, seq_len)`). Every layer runs over the whole sequence; a
    position that skips a layer keeps its state through it (`torch.where`), so it enters its first layer with the
    embedding, and no position that runs a layer attends to one that skipped it (those come later: causal mask).
    Gradients flow (no torch.no_grad here).
    """
    adapter, layers, final_logits = skipdecode_parts(model)
    num_layers = len(layers)
    mask = prompt_mask(input_ids, attention_mask)
    positions = positions_from_mask(mask)
    depth = _depth_per_position(schedule_per_position, input_ids.shape, num_layers, input_ids.device)
    inputs = {"input_ids": input_ids, "attention_mask": mask_arg(mask), "position_ids": positions, "use_cache": False}
    hidden, call = capture_stack(model, inputs, adapter=adapter)  # [batch, seq, hidden] embedded
    for idx in range(num_layers):
        runs = depth >= num_layers - idx  # [batch, seq] positions whose top-n layers include this one
        if not bool(runs.any()):
            continue
        out = call.run(hidden, idx, idx + 1)
        hidden = out if bool(runs.all()) else torch.where(runs[..., None], out, hidden)
    return final_logits(hidden)


@torch.no_grad()
def skipdecode_perplexity(
    model: nn.Module,
    token_blocks: torch.Tensor,
    schedule: SkipSchedule,
    *,
    prompt_len: int,
    batch_size: int = 8,
) -> float:
    """Perplexity of tokens prompt_len.. of each block [n, seq] under SkipDecode: the first prompt_len tokens are the
    prompt (full depth), the rest are scored as if generated under `schedule` (teacher forcing). The full model's
    perplexity on the same tokens: `SkipSchedule.constant(num_layers, num_layers)`."""
    if token_blocks.dim() != 2 or not 1 <= prompt_len < token_blocks.shape[1]:
        raise ValueError(
            f"need token blocks [n, seq] and 1 <= prompt_len < seq, got {tuple(token_blocks.shape)}, {prompt_len}"
        )
    device = next(model.parameters()).device
    per_position = schedule.for_sequence(prompt_len, token_blocks.shape[1])
    nll, count = 0.0, 0
    for ids in token_blocks.split(batch_size):
        ids = ids.to(device)
        logits = skipdecode_logits(model, ids, per_position)[:, prompt_len - 1 : -1].float()  # predict prompt_len..
        target = ids[:, prompt_len:]
        nll += float(nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)


__all__ = [
    "SkipDecodeOutput",
    "SkipSchedule",
    "StepCost",
    "default_floor",
    "measure_step_cost",
    "floored_schedule",
    "skipdecode_generate",
    "skipdecode_logits",
    "skipdecode_parts",
    "skipdecode_perplexity",
]
