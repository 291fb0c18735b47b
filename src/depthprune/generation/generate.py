"""Greedy text generation with token-level early exit, batched, with a correct KV cache.

Each new token is embedded by the model's own forward, which also builds the attention mask and position embeddings
for it and is stopped before the first decoder layer (`capture_layer_inputs`); the decoder layers are then run one by
one with exactly those arguments. After each layer that has an exit, every running row asks the criterion; rows that
exit take the exit's argmax as their next token and leave the running set, so the upper layers run on fewer rows. The
last layer always exits through the model's own final norm and LM head. Skipped layers get their KV entries by the
chosen strategy (see `depthprune.kv`).

Exit layers are 0-based decoder layer indices: a token with exit layer e ran layers 0..e; num_layers - 1 means the full
model; -1 marks the padding generated after a row's end-of-sequence token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from depthprune.adapters.registry import get_adapter
from depthprune.exits.lm_heads import ExitHeadsLike
from depthprune.exits.token_criteria import TokenCriterion, TokenState, parse_criterion
from depthprune.kv import DeferredKV, RowView, check_cache, grow_cache, propagate, rows_call, with_cache
from depthprune.runner import capture_layer_inputs

KV_MODES = tuple(__import__("depthprune.registry").registry.KV_STRATEGIES)  # names: depthprune.registry


@dataclasses.dataclass
class EarlyExitOutput:
    """sequences: [batch, prompt + new] token ids (prompt included, as `model.generate` returns them).
    exit_layers: [batch, new] 0-based layer after which each new token exited (num_layers - 1: full depth; -1: padding
    after end of sequence), or None when not asked for. step_times: seconds per generated token (the first includes
    the prompt's prefill), when `timing=True`. past_key_values: the DynamicCache after the last step (rectangular:
    every layer holds every row at every position fed to the model; in "recompute" mode unfilled holes are zeros).
    """

    sequences: torch.Tensor
    exit_layers: torch.Tensor | None
    num_layers: int
    step_times: list[float] | None = None
    past_key_values: DynamicCache | None = None

    def mean_layers(self) -> float:
        """Average number of decoder layers run per generated token (padding after end of sequence excluded)."""
        if self.exit_layers is None:
            raise ValueError("exit layers were not recorded (return_exit_layers=False)")
        real = self.exit_layers[self.exit_layers >= 0]
        return float((real + 1).float().mean()) if real.numel() else float("nan")


def prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The prompts' attention mask as a long tensor on input_ids' device (all ones when None), shapes checked."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    return mask


def early_exit_generate(
    model: nn.Module,
    heads: ExitHeadsLike,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    criterion: TokenCriterion | str,
    max_new_tokens: int,
    kv: str = "propagate",
    deep_prefill: bool = True,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    return_exit_layers: bool = True,
    timing: bool = False,
) -> EarlyExitOutput:
    """Greedy decoding where each token of each row may exit after any layer in `heads.layers`.

    criterion: a token criterion or 'name:threshold' (see `depthprune.exits.token_criteria`).
    kv: "propagate" (CALM: skipped layers get keys/values computed from the exited state) or "recompute" (EE-LLM:
        skipped entries are holes, filled by the row's next token that reaches the layer).
    deep_prefill: True runs the whole prompt through the full model, so the first new token is the full model's.
        False runs all prompt positions but the last through the full model and treats the last one like a generated
        token: it may exit (its skipped layers are handled by `kv`), deciding the first new token.
    eos_token_id: None takes the model's generation_config.eos_token_id; pass () to never stop early. Rows that ended
        get `pad_token_id` (default: generation_config.pad_token_id, else the first eos id) and run no layer.
    With a criterion that never fires, the result is token-identical to `model.generate(do_sample=False)`.
    """
    crit = parse_criterion(criterion) if isinstance(criterion, str) else criterion
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv strategy {kv!r}; choose one of {KV_MODES}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    adapter, layers, final_norm, lm_head = _decoder_parts(model)
    num_layers = len(layers)
    if heads.num_layers != num_layers:
        raise ValueError(f"the exit heads were built for {heads.num_layers} layers, the model has {num_layers}")
    exits = {int(i) for i in heads.layers}
    if any(not 0 <= i < num_layers - 1 for i in exits):
        raise ValueError(f"exit layers {sorted(exits)} must lie in 0..{num_layers - 2}")

    mask = prompt_mask(input_ids, attention_mask)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos, pad = _special_tokens(model, eos_token_id, pad_token_id)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate computes them

    cache = DynamicCache(config=model.config)
    check_cache(cache, num_layers)
    total = prompt_len + max_new_tokens
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new_tokens), pad)], dim=1)
    exit_layers = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    times: list[float] = []
    loop = _Loop(model, heads, crit, kv, layers, final_norm, lm_head, exits, cache, batch)

    with torch.no_grad():
        start = _now(timing, device)
        n_prefill = prompt_len if deep_prefill else prompt_len - 1
        if n_prefill > 0:
            out = model(
                input_ids=input_ids[:, :n_prefill],
                attention_mask=_mask_arg(mask[:, :n_prefill]),
                position_ids=positions[:, :n_prefill],
                past_key_values=cache,
                use_cache=True,
            )
        check_cache(cache, num_layers)
        if deep_prefill:
            token = out.logits[:, -1].argmax(-1)
            layer_of = torch.full((batch,), num_layers - 1, dtype=torch.long, device=device)
        else:
            token, layer_of = loop.step(input_ids[:, -1], mask, positions[:, -1], prompt_len - 1, active, total)
        for step in range(max_new_tokens):
            token = torch.where(active, token, torch.full_like(token, pad))
            layer_of = torch.where(active, layer_of, torch.full_like(layer_of, -1))
            sequences[:, prompt_len + step] = token
            exit_layers[:, step] = layer_of
            if eos:
                active = active & ~torch.isin(token, torch.tensor(eos, device=device))
            if timing:
                now = _now(timing, device)
                times.append(now - start)
                start = now
            if step + 1 == max_new_tokens or not bool(active.any()):
                sequences = sequences[:, : prompt_len + step + 1]
                exit_layers = exit_layers[:, : step + 1]
                break
            position = prompt_len + step
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            next_pos = positions[:, -1] + 1
            positions = torch.cat([positions, next_pos[:, None]], dim=1)
            token, layer_of = loop.step(token, mask, next_pos, position, active, total)

    return EarlyExitOutput(
        sequences=sequences,
        exit_layers=exit_layers if return_exit_layers else None,
        num_layers=num_layers,
        step_times=times if timing else None,
        past_key_values=cache,
    )


class _Loop:
    """One early-exit decoding step over the decoder layers, for every active row."""

    def __init__(
        self,
        model: nn.Module,
        heads: ExitHeadsLike,
        criterion: TokenCriterion,
        kv: str,
        layers: list[nn.Module],
        final_norm: nn.Module | None,
        lm_head: nn.Module,
        exits: set[int],
        cache: DynamicCache,
        batch: int,
    ) -> None:
        self.model, self.heads, self.criterion, self.kv = model, heads, criterion, kv
        self.layers, self.final_norm, self.lm_head, self.exits = layers, final_norm, lm_head, exits
        self.cache, self.batch = cache, batch
        self.adapter = get_adapter(model)
        self.deferred: DeferredKV | None = None

    def step(
        self,
        token: torch.Tensor,  # [batch]
        mask: torch.Tensor,  # [batch, position + 1]
        pos_ids: torch.Tensor,  # [batch]
        position: int,
        active: torch.Tensor,  # bool [batch]
        total: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the token at cache position `position`; return (next token [batch], its exit layer [batch])."""
        num_layers, batch, cache = len(self.layers), self.batch, self.cache
        inputs = {
            "input_ids": token[:, None],
            "attention_mask": _mask_arg(mask),
            "position_ids": pos_ids[:, None],
            "past_key_values": cache,
            "use_cache": True,
        }
        hidden, call = capture_layer_inputs(self.model, inputs, adapter=self.adapter)  # [batch, 1, hidden]
        if self.kv == "recompute":
            if self.deferred is None:
                self.deferred = DeferredKV(batch, total, num_layers, hidden)
            self.deferred.add_step(position, call)
        next_token = token.new_zeros(batch)
        exit_layer = torch.full((batch,), -1, dtype=torch.long, device=token.device)

        running = active.nonzero().flatten()  # [n] rows still going up
        h = hidden.index_select(0, running)  # [n, 1, hidden]
        gone_rows = running[:0]  # rows that exited (propagate: they still need keys/values above their exit)
        gone_hidden = h[:0]
        for idx, layer in enumerate(self.layers):
            if gone_rows.numel() and self.kv == "propagate":
                propagate(layer, call, cache, gone_rows, gone_hidden, position)
            if not running.numel():
                if self.kv == "propagate" and gone_rows.numel():
                    continue
                break
            if self.deferred is not None:
                self.deferred.fill(idx, layer, running, cache, position)
            rows_arg = None if running.numel() == batch else running
            sub = with_cache(rows_call(call, running), RowView(cache, rows_arg, position, batch))
            prev, h = h, sub.run(layer, h)
            if idx == num_layers - 1:
                logits = self.lm_head(self.final_norm(h) if self.final_norm is not None else h)[:, -1]
                go = torch.ones(running.numel(), dtype=torch.bool, device=h.device)
            elif idx in self.exits:
                state = self._state(idx, h, prev, running)
                go = self.criterion.decide(state).to(torch.bool).reshape(-1)
                if go.shape[0] != running.numel():
                    raise ValueError(
                        f"{self.criterion.name}.decide gave {go.shape[0]} decisions for {running.numel()} rows"
                    )
                if not bool(go.any()):
                    continue
                logits = state.logits[go] if state.has_logits else self.heads.logits(idx, h[go])[:, -1]
            else:
                continue
            out_rows = running[go]
            next_token[out_rows] = logits.argmax(-1).to(next_token.dtype)
            exit_layer[out_rows] = idx
            if self.deferred is not None and idx < num_layers - 1:
                self.deferred.exited(out_rows, position, idx, h[go, -1])
            if self.kv == "propagate" and idx < num_layers - 1:
                gone_rows = torch.cat([gone_rows, out_rows])
                gone_hidden = torch.cat([gone_hidden, h[go]])
            running, h = running[~go], h[~go]

        grow_cache(cache, position + 1, batch)  # layers no row reached keep holes at this position
        if self.deferred is not None:
            self.deferred.skipped((~active).nonzero().flatten(), position)
            self.deferred.forget(active)
        return next_token, exit_layer

    def _state(self, idx: int, h: torch.Tensor, prev: torch.Tensor, running: torch.Tensor) -> TokenState:
        heads = self.heads

        def confidence() -> torch.Tensor | None:
            conf = heads.confidence(idx, h)
            return None if conf is None else conf[:, -1]

        return TokenState(
            idx,
            len(self.layers),
            h[:, -1],
            prev[:, -1],
            rows=running,
            logits_fn=lambda: heads.logits(idx, h)[:, -1],
            confidence_fn=confidence,
        )


def _decoder_parts(model: nn.Module) -> tuple[Any, list[nn.Module], nn.Module | None, nn.Module]:
    """Adapter, decoder layers, final norm and LM head of a decoder-only causal LM, or a clear error."""
    adapter = get_adapter(model)
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"early-exit generation supports decoder-only causal LMs; {type(model).__name__} is an encoder-decoder"
        )
    stacks = adapter.present_stacks(model)
    if [s.name for s in stacks] != ["decoder"]:
        raise ValueError(
            f"early-exit generation needs a decoder-only causal LM; {type(model).__name__} has the stacks "
            f"{[s.name for s in stacks]} (encoders cannot generate text)"
        )
    head = adapter.head(model)
    if head is None or not hasattr(model, "generate") or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no language-model head; load it with AutoModelForCausalLM")
    if head.weight.shape[0] != getattr(config, "vocab_size", head.weight.shape[0]):
        raise ValueError(f"{type(model).__name__}'s head is not a language-model head (load with AutoModelForCausalLM)")
    layers = adapter.run_sequence(model, "decoder")
    return adapter, layers, adapter.final_norm(model, "decoder"), head


def _special_tokens(
    model: nn.Module, eos_token_id: int | list[int] | tuple[int, ...] | None, pad_token_id: int | None
) -> tuple[list[int], int]:
    gen = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen, "eos_token_id", None)
    eos = [] if eos_token_id is None else [int(eos_token_id)] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor | None:
    # transformers' generate drops an all-ones mask (no padding); do the same so the model builds the same 4D mask.
    return None if bool(mask.all()) else mask


def _now(timing: bool, device: torch.device) -> float:
    if timing and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


__all__ = ["KV_MODES", "EarlyExitOutput", "early_exit_generate"]
