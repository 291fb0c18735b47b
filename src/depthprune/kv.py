"""Keeping the KV cache of layers a token skipped: cache views for row subsets, CALM's state propagation, and EE-LLM's
deferred recomputation.

Early exit leaves a token's upper layers unrun, yet later tokens attend to every earlier position at every layer. The
cache stays rectangular (every layer holds an entry for every row at every position, [batch, heads, seq, head_dim]) so
the model's own mask and position code keep working; what goes into the entries of skipped layers is the strategy:

- propagate (CALM, Schuster et al. 2022): the skipped layer's own forward is run on the exited hidden state, and stopped
  by `StoreAndStop` right after it has computed its keys and values (input norm, k/v projections, rotary): attention
  and MLP are not computed. Later tokens attend to these approximate entries.
- recompute (EE-LLM, Chen et al. 2024): the entries are left as holes and the exited state is held; when the row's
  next token reaches that layer, the held states of its holes are first run through the layer (oldest first, each with
  the exact arguments the model gave that position's token), which fills the holes with the keys/values the full model
  would have there, and their outputs become the held states for the layer above.

What is exact, what is approximate:
- Both: a token that runs layer l attends, at layer l, to an entry for every earlier position; the prompt (deep
  prefill) and every layer a token actually runs hold the keys/values of the states that token really had.
- propagate: the entries of a skipped layer l come from the state leaving the exit layer instead of the state leaving
  layer l - 1, so a later, deeper token attends to approximate keys/values there (CALM's approximation); they are never
  corrected.
- recompute: once filled, every entry equals what the full model computes on the same tokens (the held states are the
  exact inputs of the layer, and all earlier positions are filled before a hole is computed). Holes are never attended:
  a row's token reaches layer l only after all the row's holes at l are filled, so no per-layer hole mask is needed.
  Holes of tokens that no later token goes deep enough for stay zeros (unread). The cost is the deferred work: each
  hole is one extra single-position layer call, batched across rows by position.
- Only the early-exited token itself is approximate (it is the exit's argmax, not the full model's).

Layers are always the model's own modules, called with the arguments the model's own forward captured
(`depthprune.runner.capture_layer_inputs`); only the cache object passed to them is replaced by a view.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from depthprune.runner import LayerCall


class KVStored(Exception):
    """Raised by `StoreAndStop.update` once the layer's keys/values are written: stops the rest of the layer."""


def check_cache(cache: Any, num_layers: int) -> None:
    """Raise a clear error unless `cache` is a DynamicCache of `num_layers` plain full-attention layers."""
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise ValueError(
            f"early-exit generation needs a transformers DynamicCache without offloading, got {type(cache).__name__}"
        )
    if len(cache.layers) != num_layers:
        raise ValueError(
            f"the model's cache has {len(cache.layers)} layers but its decoder {num_layers}; early-exit generation "
            "needs one full-attention cache layer per decoder layer"
        )
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"early-exit generation supports full-attention decoders only: cache layer {i} is "
                f"{type(layer).__name__} (sliding-window, chunked, linear or shared-KV attention is not supported)"
            )


def grow_cache(cache: DynamicCache, length: int, batch_size: int, like: torch.Tensor | None = None) -> None:
    """Give every layer of `cache` at least `length` positions, appending zero entries (holes) where needed.

    `like`: a key tensor [*, heads, *, head_dim] giving shape/dtype/device for layers not initialized yet (default: the
    first initialized layer).
    """
    if like is None:
        like = next((layer.keys for layer in cache.layers if layer.is_initialized and layer.keys.dim() == 4), None)
    for layer in cache.layers:
        _grow_layer(layer, length, batch_size, like)


def _grow_layer(layer: DynamicLayer, length: int, batch_size: int, like: torch.Tensor | None) -> None:
    if not layer.is_initialized or layer.keys.dim() != 4:
        if like is None:
            raise RuntimeError("cannot size the KV cache: no layer holds keys yet")
        if not layer.is_initialized:
            layer.lazy_initialization(like, like)
        shape = (batch_size, like.shape[1], 0, like.shape[-1])
        layer.keys = like.new_zeros(shape)
        layer.values = like.new_zeros(shape)
    have = layer.keys.shape[-2]
    if have < length:
        pad = layer.keys.new_zeros((*layer.keys.shape[:2], length - have, layer.keys.shape[-1]))
        layer.keys = torch.cat([layer.keys, pad], dim=-2)
        layer.values = torch.cat([layer.values, pad.clone()], dim=-2)


class RowView:
    """A Cache-like view of some rows of a DynamicCache, for a token at one position.

    `update(k, v, layer_idx)` (k, v: [len(rows), kv_heads, 1, head_dim]) writes the new entries at `position` of those
    rows of the real cache (growing it with holes if needed) and returns those rows' history up to and including
    `position` ([len(rows), kv_heads, position + 1, head_dim]), what a DynamicCache returns to a batch of these rows.
    rows=None means every row of the batch.
    """

    def __init__(self, cache: DynamicCache, rows: torch.Tensor | None, position: int, batch_size: int) -> None:
        self.cache = cache
        self.rows = rows
        self.position = int(position)
        self.batch_size = int(batch_size)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1:
            raise RuntimeError(f"a row view takes one position at a time, got {key_states.shape[-2]}")
        layer = self.cache.layers[layer_idx]
        _grow_layer(layer, self.position + 1, self.batch_size, key_states)
        p = self.position
        if self.rows is None:
            layer.keys[:, :, p] = key_states[:, :, 0]
            layer.values[:, :, p] = value_states[:, :, 0]
            return layer.keys[:, :, : p + 1], layer.values[:, :, : p + 1]
        rows = self.rows.to(layer.keys.device)
        layer.keys[rows, :, p] = key_states[:, :, 0]
        layer.values[rows, :, p] = value_states[:, :, 0]
        return layer.keys[rows, :, : p + 1], layer.values[rows, :, : p + 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.position + query_length, 0


class StoreAndStop(RowView):
    """A row view whose `update` stores the keys/values and raises `KVStored`: the layer computes nothing more."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        super().update(key_states, value_states, layer_idx)
        raise KVStored


def with_cache(call: LayerCall, view: Any) -> LayerCall:
    """The same layer call with every Cache argument (past_key_values / layer_past, by keyword or position) replaced
    by `view`."""
    found = False

    def swap(value: Any) -> Any:
        nonlocal found
        if isinstance(value, Cache):
            found = True
            return view
        return value

    args = tuple(swap(a) for a in call.args)
    kwargs = {k: swap(v) for k, v in call.kwargs.items()}
    if not found:
        raise RuntimeError(
            "the model's forward passed no KV cache to its layers; early-exit generation needs use_cache=True and a "
            "DynamicCache reaching every layer"
        )
    return LayerCall(args, kwargs, call.batch_size)


def rows_call(call: LayerCall, rows: torch.Tensor) -> LayerCall:
    """`call.select(rows)` without the shortcut that returns the same object (callers swap its cache)."""
    return (
        call.select(rows)
        if rows.numel() != call.batch_size
        else LayerCall(call.args, dict(call.kwargs), call.batch_size)
    )


def propagate(
    layer: torch.nn.Module,
    call: LayerCall,
    cache: DynamicCache,
    rows: torch.Tensor,
    hidden: torch.Tensor,
    position: int,
) -> None:
    """CALM state propagation: write layer `layer`'s keys/values at `position` for `rows`, computed by the layer's own
    forward from `hidden` ([len(rows), 1, hidden_size], the states those rows exited with) and stopped before attention.

    `call` is the full-batch call the model gave this step's tokens.
    """
    sub = with_cache(rows_call(call, rows), StoreAndStop(cache, rows, position, call.batch_size))
    try:
        sub.run(layer, hidden)
    except KVStored:
        return
    raise RuntimeError(f"{type(layer).__name__} finished without writing its keys/values to the cache")


class DeferredKV:
    """EE-LLM's deferred recomputation: which cache entries are holes, and the states that will fill them.

    depth[b, p]: how many decoder layers hold real keys/values for row b at position p (layers 0..depth-1); held[b, p]:
    the state leaving layer depth-1 there (the input of layer depth). calls[p]: the full-batch layer call the model gave
    the token at position p, kept while some row still has a hole at p.
    Invariant (asserted): when a row's token runs layer l, every earlier position of that row has depth >= l; `fill`
    then raises the positions with depth == l to l + 1, oldest first, so a token never attends to a hole.
    """

    def __init__(self, batch_size: int, length: int, num_layers: int, like: torch.Tensor) -> None:
        self.num_layers = num_layers
        self.depth = torch.full((batch_size, length), num_layers, dtype=torch.long, device=like.device)
        self.held = like.new_zeros((batch_size, length, like.shape[-1]))
        self.calls: dict[int, LayerCall] = {}

    def add_step(self, position: int, call: LayerCall) -> None:
        self.calls[position] = call

    def exited(self, rows: torch.Tensor, position: int, layer: int, hidden: torch.Tensor) -> None:
        """`rows` exited after `layer` at `position` with states `hidden` [len(rows), hidden_size]."""
        self.depth[rows, position] = layer + 1
        self.held[rows, position] = hidden.to(self.held.dtype)

    def skipped(self, rows: torch.Tensor, position: int) -> None:
        """`rows` ran no layer at all at `position` (finished sequences); their entries stay holes forever."""
        self.depth[rows, position] = 0

    def fill(
        self, layer_idx: int, layer: torch.nn.Module, rows: torch.Tensor, cache: DynamicCache, position: int
    ) -> int:
        """Fill the holes of layer `layer_idx` for `rows` at positions before `position`; return how many."""
        depth = self.depth[rows, :position]  # [n, position]
        if bool((depth < layer_idx).any()):
            raise RuntimeError("deferred KV invariant broken: a position below this layer was never filled")
        todo = depth == layer_idx
        if not bool(todo.any()):
            return 0
        count = 0
        for p in todo.any(0).nonzero().flatten().tolist():  # oldest first: later holes attend to earlier ones
            sub_rows = rows[todo[:, p]]
            call = with_cache(rows_call(self.calls[p], sub_rows), RowView(cache, sub_rows, p, self.depth.shape[0]))
            out = call.run(layer, self.held[sub_rows, p].unsqueeze(1))  # [n, 1, hidden]
            self.held[sub_rows, p] = out[:, 0].to(self.held.dtype)
            self.depth[sub_rows, p] = layer_idx + 1
            count += int(sub_rows.numel())
        return count

    def forget(self, active: torch.Tensor) -> None:
        """Drop the layer calls of positions where no `active` row (bool [batch]) has a hole left."""
        if not bool(active.any()):
            self.calls.clear()
            return
        for p in list(self.calls):
            if bool((self.depth[active, p] >= self.num_layers).all()):
                del self.calls[p]
