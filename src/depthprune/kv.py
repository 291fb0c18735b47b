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

Attention types (Gemma 3, Mistral, Qwen 2 mix sliding-window and full attention layers): every cache layer is a plain
full-length `DynamicLayer` (`decoder_cache`), also for sliding layers. The model's own sliding-window mask, built
against such a cache, hides the positions outside the window (transformers counts the window in cache columns), so
the layers attend to exactly what they attend to with transformers' own `DynamicSlidingWindowLayer` (the tests compare
with `model.generate`). Why not keep the sliding layers: they drop old columns and roll, while early exit, speculative
crops and SkipDecode address entries by absolute column (holes, row views, crops); a full-length layer keeps every
column addressable at the cost of a full-attention layer's memory. Because the window counts columns, real tokens of a
row must stay contiguous: `left_align` moves a row's masked columns to its left, where they act as left padding.
Chunked, linear (recurrent) and shared-KV attention keep state that is not one entry per column: `check_decoder`
refuses them.

Layers are always the model's own modules, called with the arguments the model's own forward captured
(`depthprune.runner.capture_stack`); only the cache object passed to them is replaced by a view. All padding, growing
and surgery of cache tensors lives in this module.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from depthprune.runner import StackCall

ATTENTION_TYPES = ("full_attention", "sliding_attention")


class KVStored(Exception):
    """Raised by `StoreAndStop.update` once the layer's keys/values are written: stops the rest of the layer."""


def check_decoder(model: torch.nn.Module, what: str = "early-exit generation") -> None:
    """Raise a clear error unless every decoder layer of `model` keeps one key/value entry per position (full or
    sliding-window attention)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(config)
    bad = sorted({t for t in types if t not in ATTENTION_TYPES})
    if bad or getattr(config, "num_kv_shared_layers", 0):
        bad = bad or ["shared-KV"]
        raise ValueError(
            f"{what} supports full-attention and sliding-window attention layers; {type(model).__name__} has "
            f"{', '.join(bad)} layers (chunked, linear/recurrent and shared-KV attention keep state that is not one "
            "cache entry per position)"
        )


def decoder_cache(model: torch.nn.Module, num_layers: int, what: str = "early-exit generation") -> DynamicCache:
    """An empty DynamicCache of `num_layers` full-length DynamicLayers (sliding layers included: see the module
    docstring), after `check_decoder`."""
    check_decoder(model, what)
    cache = DynamicCache()
    cache.layers[:] = [DynamicLayer() for _ in range(num_layers)]
    return cache


def has_sliding_layers(model: torch.nn.Module) -> bool:
    """Whether some decoder layer attends through a sliding window (which counts cache columns)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    return "sliding_attention" in types


def check_cache(cache: Any, num_layers: int) -> None:
    """Raise a clear error unless `cache` is a DynamicCache of `num_layers` plain full-length layers."""
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise ValueError(
            f"early-exit generation needs a transformers DynamicCache without offloading, got {type(cache).__name__}"
        )
    if len(cache.layers) != num_layers:
        raise ValueError(
            f"the model's cache has {len(cache.layers)} layers but its decoder {num_layers}; early-exit generation "
            "needs one cache layer per decoder layer"
        )
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"early-exit generation needs full-length cache layers (depthprune.kv.decoder_cache): cache layer {i} "
                f"is {type(layer).__name__}"
            )


def grow_cache(cache: DynamicCache, length: int, batch_size: int, like: torch.Tensor | None = None) -> None:
    """Give every layer of `cache` at least `length` positions, appending zero entries (holes) where needed.

    `like`: a key tensor [*, heads, *, head_dim] giving shape/dtype/device for layers not initialized yet (default: the
    first initialized layer).
    """
    if like is None:
        like = next((layer.keys for layer in cache.layers if layer.is_initialized and layer.keys.dim() == 4), None)
    for layer in cache.layers:
        grow_layer(layer, length, like, batch_size)


def grow_layer(layer: DynamicLayer, length: int, like: torch.Tensor | None, batch_size: int | None = None) -> None:
    """Append zero columns (holes) to one cache layer up to `length`; `like`: a key tensor [batch, kv_heads, *,
    head_dim] sizing a layer that holds nothing yet (batch_size: its batch, default like's)."""
    if not layer.is_initialized or layer.keys.dim() != 4:
        if like is None:
            raise RuntimeError("cannot size the KV cache: no layer holds keys yet")
        if not layer.is_initialized:
            layer.lazy_initialization(like, like)
        shape = (like.shape[0] if batch_size is None else batch_size, like.shape[1], 0, like.shape[-1])
        layer.keys = like.new_zeros(shape)
        layer.values = like.new_zeros(shape)
    have = layer.keys.shape[-2]
    if have < length:
        pad = layer.keys.new_zeros((*layer.keys.shape[:2], length - have, layer.keys.shape[-1]))
        layer.keys = torch.cat([layer.keys, pad], dim=-2)
        layer.values = torch.cat([layer.values, pad.clone()], dim=-2)


def truncate_layer(layer: DynamicLayer, length: int) -> None:
    """Keep the first `length` columns of a cache layer (DynamicLayer.crop takes how many to remove)."""
    have = layer.get_seq_length()
    if have > length:
        layer.crop(length - have)


def append_holes(cache: DynamicCache, layers: int, position: int, value: float = 0.0) -> None:
    """Append one entry holding `value` at `position` to cache layers 0..layers-1 (the layers a position skipped)
    and check that every layer then holds position + 1 entries."""
    for idx, layer in enumerate(cache.layers):
        if idx < layers:
            keys = layer.keys
            hole = keys.new_full((*keys.shape[:2], 1, keys.shape[-1]), value)
            layer.keys = torch.cat([keys, hole], dim=-2)
            layer.values = torch.cat([layer.values, hole.clone()], dim=-2)
        if layer.keys.shape[-2] != position + 1:
            raise RuntimeError(
                f"cache out of step: layer {idx} holds {layer.keys.shape[-2]} positions after position {position} "
                f"(expected {position + 1})"
            )


def left_align(cache: DynamicCache, mask: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row's columns right by shift[r] (its last shift[r] columns, masked ones, come first), in every
    layer and in `mask` [batch, columns]; return the rotated mask. Masked columns then sit left of a row's real ones,
    like left padding, so a sliding window (counted in columns) sees the row's latest real tokens."""
    if not bool((shift > 0).any()):
        return mask
    width = mask.shape[1]
    index = (torch.arange(width, device=mask.device) - shift[:, None]) % width  # [batch, columns]
    for i, layer in enumerate(cache.layers):
        if layer.keys.shape[-2] != width:
            raise RuntimeError(f"cache layer {i} holds {layer.keys.shape[-2]} columns, the mask {width}")
        at = index.to(layer.keys.device)[:, None, :, None].expand_as(layer.keys)
        layer.keys, layer.values = layer.keys.gather(2, at), layer.values.gather(2, at)
    return mask.gather(1, index)


def stack_rows(
    rows: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]],
) -> tuple[DynamicCache, torch.Tensor]:
    """One rectangular cache from per-row caches (rows[r]: ([(keys, values) [heads, columns, head_dim] per layer],
    mask [columns])), right-padded with masked zeros; and its [batch, columns] mask."""
    width = max(m.shape[0] for _, m in rows)
    cache = DynamicCache()
    masks = torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[0])) for _, m in rows])
    for i in range(len(rows[0][0])):
        keys = [torch.nn.functional.pad(kv[i][0], (0, 0, 0, width - kv[i][0].shape[-2])) for kv, _ in rows]
        values = [torch.nn.functional.pad(kv[i][1], (0, 0, 0, width - kv[i][1].shape[-2])) for kv, _ in rows]
        cache.update(torch.stack(keys), torch.stack(values), i)
    return cache, masks


def row_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache over one row's per-layer (keys, values) [heads, columns, head_dim] that holds views of them ([1, ...]),
    not copies: the next `update` appends to them as a DynamicCache does, the only copy of a decoding step."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k[None, :, :0], v[None, :, :0], i)  # an empty update initializes the layer (dtype, device)
        cache.layers[i].keys, cache.layers[i].values = k[None], v[None]
    return cache


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
        p = self.position
        if self.rows is None and layer.is_initialized and layer.keys.dim() == 4 and layer.keys.shape[-2] == p:
            # every row, next column: append as DynamicCache does (no hole to write into first)
            layer.keys = torch.cat([layer.keys, key_states], dim=-2)
            layer.values = torch.cat([layer.values, value_states], dim=-2)
            return layer.keys, layer.values
        grow_layer(layer, p + 1, key_states, self.batch_size)
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


def propagate(
    stack: StackCall, layer_idx: int, cache: DynamicCache, rows: torch.Tensor, hidden: torch.Tensor, position: int
) -> None:
    """CALM state propagation: write layer `layer_idx`'s keys/values at `position` for `rows`, computed by the layer's
    own forward from `hidden` ([len(rows), 1, hidden_size], the states those rows exited with) and stopped before
    attention.

    `stack` is the full-batch StackCall the model gave this step's tokens.
    """
    _store_only(stack, layer_idx, hidden, rows, StoreAndStop(cache, rows, position, stack.batch_size))


class AppendAndStop:
    """A Cache-like stand-in whose `update` appends a block of positions' keys/values to the real cache's layer (as
    DynamicCache.update does) and raises `KVStored`: the layer computes nothing more."""

    def __init__(self, cache: DynamicCache) -> None:
        self.cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.cache.update(key_states, value_states, layer_idx)
        raise KVStored

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)


def propagate_block(stack: StackCall, layer_idx: int, cache: DynamicCache, hidden: torch.Tensor) -> None:
    """CALM state propagation for every position of a block at once (a prompt that a shallow prefill ran): append
    layer `layer_idx`'s keys/values of `hidden` [batch, seq, hidden] to its (empty) cache layer, computed by the
    layer's own forward with the block's arguments (`stack`: the StackCall the model gave the block) and stopped before
    attention."""
    _store_only(stack, layer_idx, hidden, None, AppendAndStop(cache))


KV_LAYOUTS = ("rotary",)


def rotary_keys_values(layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A "rotary"-layout layer's keys and values of `hidden` [n, seq, hidden_size] ([n, kv_heads, seq, head_dim]
    each), computed as its forward computes them (input norm, k/v projections, the optional per-head key norm, rotary
    embedding of the keys) without the query projection, attention, output projection and MLP that a skipped token's
    cache entry does not need. `kwargs`: the layer's call arguments (their `position_embeddings` (cos, sin))."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(x).view(shape).transpose(1, 2)
    values = attn.v_proj(x).view(shape).transpose(1, 2)
    if getattr(attn, "k_norm", None) is not None:
        keys = attn.k_norm(keys)
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)  # transformers' rotate_half
    return (keys * cos) + (rotated * sin), values


def _kv_alone(stack: StackCall, layer_idx: int) -> bool:
    """The stack's layout lets layer `layer_idx`'s keys/values be computed alone, with the arguments this call has."""
    if stack.kv_layout is None:
        return False
    if stack.kv_layout not in KV_LAYOUTS:
        raise ValueError(f"unknown kv_layout {stack.kv_layout!r}; known: {', '.join(KV_LAYOUTS)}")
    call, attn = stack.calls[layer_idx], getattr(stack.layers[layer_idx], "self_attn", None)
    return not call.args and "position_embeddings" in call.kwargs and hasattr(attn, "layer_idx")


def _store_only(stack: StackCall, layer_idx: int, hidden: torch.Tensor, rows: torch.Tensor | None, view: Any) -> None:
    try:
        if _kv_alone(stack, layer_idx):
            layer = stack.layers[layer_idx]
            call = stack.calls[layer_idx] if rows is None else stack.calls[layer_idx].select(rows)
            keys, values = rotary_keys_values(layer, hidden, call.kwargs)
            view.update(keys, values, layer.self_attn.layer_idx)
        else:
            stack.run(hidden, layer_idx, layer_idx + 1, rows=rows, cache=view)
    except KVStored:
        return
    raise RuntimeError(
        f"{type(stack.layers[layer_idx]).__name__} finished without writing its keys/values to the cache"
    )


class DeferredKV:
    """EE-LLM's deferred recomputation: which cache entries are holes, and the states that will fill them.

    depth[b, p]: how many decoder layers hold real keys/values for row b at position p (layers 0..depth-1); held[b, p]:
    the state leaving layer depth-1 there (the input of layer depth). calls[p]: the full-batch StackCall the model gave
    the token at position p, kept while some row still has a hole at p.
    Invariant (asserted): when a row's token runs layer l, every earlier position of that row has depth >= l; `fill`
    then raises the positions with depth == l to l + 1, oldest first, so a token never attends to a hole.
    """

    def __init__(self, batch_size: int, length: int, num_layers: int, like: torch.Tensor) -> None:
        self.num_layers = num_layers
        self.depth = torch.full((batch_size, length), num_layers, dtype=torch.long, device=like.device)
        self.held = like.new_zeros((batch_size, length, like.shape[-1]))
        self.calls: dict[int, StackCall] = {}

    def add_step(self, position: int, call: StackCall) -> None:
        self.calls[position] = call

    def exited(self, rows: torch.Tensor, position: int, layer: int, hidden: torch.Tensor) -> None:
        """`rows` exited after `layer` at `position` with states `hidden` [len(rows), hidden_size]."""
        self.depth[rows, position] = layer + 1
        self.held[rows, position] = hidden.to(self.held.dtype)

    def skipped(self, rows: torch.Tensor, position: int) -> None:
        """`rows` ran no layer at all at `position` (finished sequences); their entries stay holes forever."""
        self.depth[rows, position] = 0

    def fill(self, layer_idx: int, rows: torch.Tensor, cache: DynamicCache, position: int) -> int:
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
            view = RowView(cache, sub_rows, p, self.depth.shape[0])
            out = self.calls[p].run(
                self.held[sub_rows, p].unsqueeze(1), layer_idx, layer_idx + 1, rows=sub_rows, cache=view
            )
            # out: [n, 1, hidden]
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


class KVStrategy(Protocol):
    """What a decoding loop asks of a KV strategy for the layers some rows skip (one instance per generation, bound to
    its cache; built as `cls(cache, batch_size, num_layers, length)`; registered by name in depthprune.registry)."""

    name: str

    def start_step(self, call: StackCall, position: int, hidden: torch.Tensor) -> None: ...

    def before_layer(self, layer_idx: int, running: torch.Tensor) -> None: ...

    def pending(self) -> bool: ...

    def left(self, rows: torch.Tensor, layer_idx: int, hidden: torch.Tensor) -> None: ...

    def end_step(self, active: torch.Tensor) -> None: ...


class Propagate:
    """CALM's strategy, for a decoding loop (registered as "propagate"): the rows that leave a step's layer stack early
    still get keys/values at every layer above, computed from their exit state by `propagate`.

    The loop calls, per step: `start_step`, then for each layer `before_layer` (propagates the rows gone so far into
    this layer), `left` for rows that stop after a layer, and `end_step`; `pending()` says whether layers above still
    need work although no row runs them."""

    name = "propagate"

    def __init__(self, cache: DynamicCache, batch_size: int, num_layers: int, length: int) -> None:
        self.cache, self.num_layers = cache, num_layers
        self.call: StackCall | None = None
        self.position = 0
        self.rows = torch.zeros(0, dtype=torch.long)
        self.hidden: torch.Tensor | None = None

    def start_step(self, call: StackCall, position: int, hidden: torch.Tensor) -> None:
        """hidden [batch, 1, hidden] entering the stack (sets shapes)."""
        self.call, self.position = call, position
        self.rows = torch.zeros(0, dtype=torch.long, device=hidden.device)
        self.hidden = hidden[:0]

    def before_layer(self, layer_idx: int, running: torch.Tensor) -> None:
        if self.rows.numel():
            propagate(self.call, layer_idx, self.cache, self.rows, self.hidden, self.position)

    def pending(self) -> bool:
        return bool(self.rows.numel())

    def left(self, rows: torch.Tensor, layer_idx: int, hidden: torch.Tensor) -> None:
        """`rows` stopped after `layer_idx` with states hidden [len(rows), 1, hidden]."""
        if layer_idx < self.num_layers - 1:
            self.rows = torch.cat([self.rows, rows])
            self.hidden = torch.cat([self.hidden, hidden])

    def end_step(self, active: torch.Tensor) -> None:
        """active: bool [batch], the rows that took part in this step."""


class Recompute:
    """EE-LLM's strategy, for a decoding loop (registered as "recompute"): skipped entries stay holes, filled by
    `DeferredKV` when the row's next token reaches the layer. Same calls as `Propagate`."""

    name = "recompute"

    def __init__(self, cache: DynamicCache, batch_size: int, num_layers: int, length: int) -> None:
        self.cache, self.batch_size, self.num_layers, self.length = cache, batch_size, num_layers, length
        self.deferred: DeferredKV | None = None
        self.position = 0

    def start_step(self, call: StackCall, position: int, hidden: torch.Tensor) -> None:
        if self.deferred is None:
            self.deferred = DeferredKV(self.batch_size, self.length, self.num_layers, hidden)
        self.deferred.add_step(position, call)
        self.position = position

    def before_layer(self, layer_idx: int, running: torch.Tensor) -> None:
        self.deferred.fill(layer_idx, running, self.cache, self.position)

    def pending(self) -> bool:
        return False

    def left(self, rows: torch.Tensor, layer_idx: int, hidden: torch.Tensor) -> None:
        if layer_idx < self.num_layers - 1:
            self.deferred.exited(rows, self.position, layer_idx, hidden[:, -1])

    def end_step(self, active: torch.Tensor) -> None:
        self.deferred.skipped((~active).nonzero().flatten(), self.position)
        self.deferred.forget(active)
