"""Batched inference with layer skipping: at each layer, only the rows whose router says "run" are computed (gathered
with the runner's `StackCall.run(rows=...)`, scattered back); the others keep their state and go on to the next layer.

Decoders (`skip_generate`): greedy decoding with a KV cache. The prompt runs every layer (deep prefill, so the first
new token is the untouched model's); each later token decides per layer. A token that skips layer l still owes later
tokens a key/value entry at l. Its state entering l is known exactly (a skipped layer passes it on), so the entry is
the layer's own key/value projection of that state, computed by the layer's own forward stopped before attention
(depthprune.kv.propagate, CALM's mechanism):
- kv="propagate": at once, in the step that skipped;
- kv="recompute" (EE-LLM's deferral): the entry stays a hole and the state is held; when a later token of the row
  runs layer l, the row's holes at l are filled first, oldest first. Holes no later token needs are never computed.
Both give the same cache (and the same tokens) as `depthprune.skipping.dense.routed_pass` computes teacher-forced.

Encoders (`RoutedClassifier`): per sample, the whole input runs a layer or skips it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from depthprune import decoding
from depthprune.errors import RouterError
from depthprune.kv import RowView, check_cache, decoder_cache, grow_cache, propagate
from depthprune.runner import StackCall, capture_stack
from depthprune.skipping.routers import check_threshold, sink_positions

KV_MODES = ("propagate", "recompute")
PREFILLS = ("full", "routed")


@dataclasses.dataclass
class SkipOutput:
    """sequences [batch, prompt + new] (as model.generate returns them); executed [batch, new]: layers each new token
    ran (the first new token comes from the prompt's full pass: num_layers; 0 marks padding after end of sequence);
    step_times: seconds per new token when timing=True; layer_rows[s][l]: how many rows computed layer l in decode
    step s (the steps after the first new token; the batch's unfinished rows when none skipped; with sub-layer
    routers the more of its two parts' counts, and executed is fractional: a part counts as its share). On hardware
    whose layer cost is flat in the rows it runs (weights read once per call), only the layers no row ran save time."""

    sequences: torch.Tensor
    executed: torch.Tensor
    num_layers: int
    step_times: list[float] | None = None
    layer_rows: list[list[int]] = dataclasses.field(default_factory=list)

    def mean_layers(self, skip_first: bool = False) -> float:
        """Mean layers run per generated token (padding excluded; skip_first: without the prefill's token)."""
        ex = self.executed[:, 1:] if skip_first else self.executed
        real = ex[ex > 0]
        return float(real.float().mean()) if real.numel() else float("nan")


class _Holes:
    """kv="recompute": per layer, the held states of skipped entries: (position, rows, states [n, 1, hidden], the
    step's StackCall)."""

    def __init__(self, cache: Any, batch: int) -> None:
        self.cache, self.batch = cache, batch
        self.held: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, StackCall]]] = {}

    def add(self, layer: int, position: int, rows: torch.Tensor, hidden: torch.Tensor, call: StackCall) -> None:
        self.held.setdefault(layer, []).append((position, rows, hidden, call))

    def fill(self, layer: int, rows: torch.Tensor) -> None:
        """Fill the holes of `rows` at `layer` (oldest first) before those rows run it."""
        left = []
        for position, held_rows, hidden, call in self.held.get(layer, []):
            take = torch.isin(held_rows, rows)
            if bool(take.any()):
                propagate(call, layer, self.cache, held_rows[take], hidden[take], position)
            if not bool(take.all()):
                left.append((position, held_rows[~take], hidden[~take], call))
        self.held[layer] = left


def skip_generate(
    model: nn.Module,
    routers: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    threshold: float = 0.5,
    max_new_tokens: int,
    kv: str = "propagate",
    prefill: str = "full",
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    timing: bool = False,
) -> SkipOutput:
    """Greedy decoding where each new token runs layer l only if routers.run_mask(l, state, None, threshold) says so.

    routers: token routers (`layers`, `num_layers`, `run_mask(layer, hidden [n, 1, hidden], mask, threshold)` -> bool
    [n, 1] or None for an unrouted layer). With threshold 0 the result is token-identical to model.generate.
    prefill "full": the prompt runs every layer (the first new token is the untouched model's); "routed": the
    prompt's tokens follow their routers too (every layer is computed on the whole prompt, as in
    `depthprune.skipping.dense.routed_pass`, so a skipped token's cache entry is its entering state's, as kv
    propagation gives; no prefill saving), so the whole generation is what the routed model computes: with
    untrained static-init routers (depthprune.skipping.init), the static plan's pruned model's greedy tokens.
    """
    threshold = check_threshold(threshold)
    if kv not in KV_MODES:
        raise RouterError(f"unknown kv strategy {kv!r} for layer skipping; choose one of {', '.join(KV_MODES)}")
    if prefill not in PREFILLS:
        raise RouterError(f"unknown prefill {prefill!r} for layer skipping; choose one of {', '.join(PREFILLS)}")
    if max_new_tokens < 1:
        raise RouterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if getattr(routers, "granularity", "token") != "token":
        raise RouterError("generation needs per-token routers (token_linear); these decide per sample")
    adapter, layers, final_logits = decoding.decoder_parts(model, "layer-skipping generation")
    num_layers = len(layers)
    if routers.num_layers != num_layers:
        raise RouterError(f"the routers were built for {routers.num_layers} layers, the model has {num_layers}")

    mask = decoding.prompt_mask(input_ids, attention_mask)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos, pad = decoding.special_tokens(model, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, device=device)
    positions = decoding.positions_from_mask(mask)
    cache = decoder_cache(model, num_layers, "layer-skipping generation")
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new_tokens), pad)], dim=1)
    executed = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    holes = _Holes(cache, batch) if kv == "recompute" else None
    times: list[float] = []
    layer_rows: list[list[int]] = []
    units = _units(routers, layers)
    if any(part is not None for unit in units for part, _ in unit):
        executed = executed.float()  # sub-layers count as their share of a layer

    with torch.no_grad():
        start = decoding.wall_time(device, sync=timing)
        if prefill == "full":
            out = model(**decoding.step_inputs(model, input_ids, mask, positions, cache, last_logits=True))
            check_cache(cache, num_layers)
            token = out.logits[:, -1].argmax(-1)
            ran = torch.full((batch,), num_layers, dtype=executed.dtype, device=device)
        else:
            token, ran = _routed_prefill(model, routers, adapter, final_logits, input_ids, mask, positions, cache,
                                         threshold)  # fmt: skip
            check_cache(cache, num_layers)
        for step in range(max_new_tokens):
            token = torch.where(active, token, torch.full_like(token, pad))
            sequences[:, prompt_len + step] = token
            executed[:, step] = torch.where(active, ran, torch.zeros_like(ran))
            if eos:
                active = active & ~torch.isin(token, eos_t)
            if timing:
                now = decoding.wall_time(device, sync=timing)
                times.append(now - start)
                start = now
            if step + 1 == max_new_tokens or not bool(active.any()):
                sequences, executed = sequences[:, : prompt_len + step + 1], executed[:, : step + 1]
                break
            position = prompt_len + step
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            next_pos = positions[:, -1] + 1
            positions = torch.cat([positions, next_pos[:, None]], dim=1)
            inputs = decoding.step_inputs(model, token[:, None], mask, next_pos[:, None], cache)
            hidden, call = capture_stack(model, inputs, adapter=adapter)  # [batch, 1, hidden], every layer's call
            rows = active.nonzero().flatten()
            every_row = rows.numel() == batch
            h = hidden if every_row else hidden.index_select(0, rows)  # [n, 1, hidden]: the active rows' states
            ran = torch.zeros(batch, dtype=executed.dtype, device=device)
            whole = None  # the step's calls over every row with the row view of every row, built once
            counts = [0] * num_layers
            layer_rows.append(counts)
            for layer in range(num_layers):
                for part, share in units[layer]:  # (None, 1): the whole layer; else attention, then MLP
                    go = routers.run_mask(layer, h, None, threshold) if part is None else routers.run_mask(
                        layer, h, None, threshold, part=part
                    )  # fmt: skip
                    go = None if go is None else go.reshape(-1).to(torch.bool)
                    cached = part != "mlp"  # the part that writes the layer's key/value entry
                    if go is not None and not bool(go.all()):
                        if cached:
                            skip = rows[~go]  # their entry at `layer`: from the state they enter it with
                            if holes is None:
                                propagate(call, layer, cache, skip, h[~go], position)
                            else:
                                holes.add(layer, position, skip, h[~go], call)
                        run, sel = rows[go], go.nonzero().flatten()
                    else:
                        run, sel = rows, None
                    counts[layer] = max(counts[layer], int(run.numel()))
                    if not run.numel():
                        continue
                    if holes is not None and cached:
                        holes.fill(layer, run)
                    if sel is None and every_row and part is None:  # the common case: no slicing, no per-layer view
                        if whole is None:
                            whole = call.with_cache(RowView(cache, None, position, batch))
                        h = whole.calls[layer].run(whole.layers[layer], h)
                        ran += share
                        continue
                    ran[run] += share
                    view = RowView(cache, None if run.numel() == batch else run, position, batch) if cached else None
                    x = h if sel is None else h.index_select(0, sel)
                    if part is None:
                        x = call.run(x, layer, layer + 1, rows=run, cache=view)
                    else:
                        x = call.run_part(x, layer, part, rows=run, cache=view)
                    h = x if sel is None else h.index_copy(0, sel, x)
            token = token.clone()
            token[rows] = final_logits(h)[:, -1].argmax(-1).to(token.dtype)
            grow_cache(cache, position + 1, batch)  # rows that ran nothing (finished) keep holes here
    return SkipOutput(sequences, executed, num_layers, times if timing else None, layer_rows)


def _units(routers: Any, layers: Any) -> list[list[tuple[str | None, float]]]:
    """Per layer, what its routers decide on: [(None, 1)] (the whole layer), or each sub-layer with its share of the
    layer ([("attention", s), ("mlp", 1 - s)]) for routers with `parts`."""
    if not getattr(routers, "parts", ()):
        return [[(None, 1)] for _ in layers]
    from depthprune.sublayers import part_shares

    routed = set(routers.layers)
    return [list(part_shares(layer).items()) if i in routed else [(None, 1)] for i, layer in enumerate(layers)]


def _routed_prefill(model, routers, adapter, final_logits, input_ids, mask, positions, cache, threshold):
    """The prompt's forward with every token following its routers: (first new token [batch], layers its last
    position ran [batch]). Each layer (sub-layer) runs on every position (writing every position's cache entry from
    the state entering it); the positions whose router says skip keep their state."""
    inputs = decoding.step_inputs(model, input_ids, mask, positions, cache)
    hidden, call = capture_stack(model, inputs, adapter=adapter)  # [batch, seq, hidden]
    units = _units(routers, call.layers)
    sinks = sink_positions(routers, tuple(input_ids.shape), mask)
    ran = torch.zeros(input_ids.shape[0], device=input_ids.device)
    for layer in range(len(call)):
        for part, share in units[layer]:
            if part is None:
                out, go = call.run(hidden, layer, layer + 1), routers.run_mask(layer, hidden, None, threshold)
            else:
                out, go = (
                    call.run_part(hidden, layer, part),
                    routers.run_mask(layer, hidden, None, threshold, part=part),
                )
            if go is None:
                hidden, ran = out, ran + share
                continue
            go = go.reshape(hidden.shape[:2]).to(torch.bool)  # [batch, seq]
            if sinks is not None:  # the sink positions run every layer
                go = go | sinks.to(go.device)
            hidden = torch.where(go[..., None], out, hidden)
            ran += share * go[:, -1].float()
    dtype = torch.float if any(part is not None for unit in units for part, _ in unit) else torch.long
    return final_logits(hidden[:, -1:])[:, -1].argmax(-1), ran.to(dtype)


@dataclasses.dataclass
class RoutedResult:
    """logits [batch, labels]; executed [batch]: layers each sample ran."""

    logits: torch.Tensor
    executed: torch.Tensor
    num_layers: int

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(-1)


class RoutedClassifier:
    """An encoder classifier with per-sample routers: at each routed layer only the samples that run it are computed.
    The model is used as is, never modified; threshold 0 gives the model's own logits."""

    def __init__(self, model: nn.Module, routers: Any, threshold: float = 0.5) -> None:
        from depthprune.adapters.registry import get_adapter
        from depthprune.exits.families import final_head

        self.threshold = check_threshold(threshold)
        if getattr(routers, "granularity", "sample") != "sample":
            raise RouterError("a classifier needs per-sample routers (sample_linear); these decide per token")
        self.model, self.routers = model, routers
        self.adapter = get_adapter(model)
        self.stack = self.adapter.present_stacks(model)[-1]
        self.final = final_head(model)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **extra: Any):
        from depthprune.exits.inference import head_forward

        inputs = {"input_ids": input_ids, **extra}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        h, call = capture_stack(self.model, inputs, stack=self.stack, adapter=self.adapter)  # [batch, seq, hidden]
        batch = h.shape[0]
        executed = torch.zeros(batch, dtype=torch.long, device=h.device)
        for layer in range(len(call)):
            go = self.routers.run_mask(layer, h, attention_mask, self.threshold)
            if go is None or bool(go.all()):
                h = call.run(h, layer, layer + 1)
                executed += 1
                continue
            sel = go.reshape(-1).nonzero().flatten()
            if sel.numel():
                h = h.index_copy(0, sel, call.run(h.index_select(0, sel), layer, layer + 1, rows=sel))
                executed[sel] += 1
        logits = head_forward(self.final, None, self.model, h)
        return RoutedResult(logits, executed, len(call))


__all__ = ["KV_MODES", "PREFILLS", "RoutedClassifier", "RoutedResult", "SkipOutput", "skip_generate"]
