"""Greedy text generation with token-level early exit, batched, with a correct KV cache.

Each new token is embedded by the model's own forward, which also builds the attention masks and position embeddings
for it without running a decoder layer (`depthprune.runner.capture_stack`); the decoder layers are then run one by
one, each with exactly its own arguments (sliding-window and full-attention layers get different masks). After each
layer that has an exit, every running row asks the criterion; rows that exit take the exit's argmax as their next
token and leave the running set, so the upper layers run on fewer rows. The last layer always exits through the
model's own final step (final norm, LM head, logit soft-capping). Skipped layers get their KV entries by the chosen
strategy (see `depthprune.kv`).

Exit layers are 0-based decoder layer indices: a token with exit layer e ran layers 0..e; num_layers - 1 means the full
model; -1 marks the padding generated after a row's end-of-sequence token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from depthprune import decoding
from depthprune.adapters.registry import get_adapter
from depthprune.exits.lm_heads import ExitHeadsLike
from depthprune.exits.token_criteria import TokenCriterion, TokenState, parse_criterion
from depthprune.kv import KVStrategy, RowView, check_cache, decoder_cache, grow_cache
from depthprune.registry import KV_STRATEGIES
from depthprune.runner import capture_stack

KV_MODES = tuple(KV_STRATEGIES)  # the built-in strategies; depthprune.registry.register_kv_strategy adds others


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
    KV_STRATEGIES.check(kv)  # an unknown name lists the registered strategies
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _, layers, final_logits = decoding.decoder_parts(model)
    num_layers = len(layers)
    if heads.num_layers != num_layers:
        raise ValueError(f"the exit heads were built for {heads.num_layers} layers, the model has {num_layers}")
    exits = {int(i) for i in heads.layers}
    if any(not 0 <= i < num_layers - 1 for i in exits):
        raise ValueError(f"exit layers {sorted(exits)} must lie in 0..{num_layers - 2}")

    mask = decoding.prompt_mask(input_ids, attention_mask)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos, pad = decoding.special_tokens(model, eos_token_id, pad_token_id)
    positions = decoding.positions_from_mask(mask)

    cache = decoder_cache(model, num_layers)
    total = prompt_len + max_new_tokens
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new_tokens), pad)], dim=1)
    exit_layers = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    times: list[float] = []
    strategy = KV_STRATEGIES.get(kv)(cache, batch, num_layers, total)  # see depthprune.kv: Propagate, Recompute
    loop = _Loop(model, heads, crit, strategy, layers, final_logits, exits, cache, batch)

    with torch.no_grad():
        start = decoding.wall_time(device, sync=timing)
        n_prefill = prompt_len if deep_prefill else prompt_len - 1
        if n_prefill > 0:
            out = model(
                **decoding.step_inputs(
                    model,
                    input_ids[:, :n_prefill],
                    mask[:, :n_prefill],
                    positions[:, :n_prefill],
                    cache,
                    last_logits=True,  # only the last position's logits are read
                )
            )
        check_cache(cache, num_layers)
        if deep_prefill:
            token = out.logits[:, -1].argmax(-1)
            layer_of = torch.full((batch,), num_layers - 1, dtype=torch.long, device=device)
        else:
            token, layer_of = loop.step(input_ids[:, -1], mask, positions[:, -1], prompt_len - 1, active)
        for step in range(max_new_tokens):
            token = torch.where(active, token, torch.full_like(token, pad))
            layer_of = torch.where(active, layer_of, torch.full_like(layer_of, -1))
            sequences[:, prompt_len + step] = token
            exit_layers[:, step] = layer_of
            if eos:
                active = active & ~torch.isin(token, torch.tensor(eos, device=device))
            if timing:
                now = decoding.wall_time(device, sync=timing)
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
            token, layer_of = loop.step(token, mask, next_pos, position, active)

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
        kv: KVStrategy,
        layers: list[nn.Module],
        final_logits: Callable[[torch.Tensor], torch.Tensor],
        exits: set[int],
        cache: DynamicCache,
        batch: int,
    ) -> None:
        self.model, self.heads, self.criterion, self.kv = model, heads, criterion, kv
        self.layers, self.final_logits, self.exits = layers, final_logits, exits
        self.cache, self.batch = cache, batch
        self.adapter = get_adapter(model)

    def step(
        self,
        token: torch.Tensor,  # [batch]
        mask: torch.Tensor,  # [batch, position + 1]
        pos_ids: torch.Tensor,  # [batch]
        position: int,
        active: torch.Tensor,  # bool [batch]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the token at cache position `position`; return (next token [batch], its exit layer [batch])."""
        num_layers, batch, cache = len(self.layers), self.batch, self.cache
        inputs = decoding.step_inputs(self.model, token[:, None], mask, pos_ids[:, None], cache)
        hidden, call = capture_stack(self.model, inputs, adapter=self.adapter)  # [batch, 1, hidden], every layer's call
        kv = self.kv
        kv.start_step(call, position, hidden)
        next_token = token.new_zeros(batch)
        exit_layer = torch.full((batch,), -1, dtype=torch.long, device=token.device)

        running = active.nonzero().flatten()  # [n] rows still going up
        h = hidden.index_select(0, running)  # [n, 1, hidden]
        rows_call = None  # the stack's calls for `running` with its cache view: rebuilt only when rows leave
        for idx in range(num_layers):
            kv.before_layer(idx, running)  # the strategy's work at this layer (propagate the rows gone, fill holes)
            if not running.numel():
                if kv.pending():
                    continue
                break
            if rows_call is None:
                rows_arg = None if running.numel() == batch else running
                rows_call = call.select(rows_arg).with_cache(RowView(cache, rows_arg, position, batch))
            prev, h = h, rows_call.run(h, idx, idx + 1)
            if idx == num_layers - 1:
                logits = self.final_logits(h)[:, -1]
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
            kv.left(out_rows, idx, h[go])
            running, h = running[~go], h[~go]
            rows_call = None

        grow_cache(cache, position + 1, batch)  # layers no row reached keep holes at this position
        kv.end_step(active)
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


__all__ = ["KV_MODES", "EarlyExitOutput", "early_exit_generate"]
