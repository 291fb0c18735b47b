"""CE-CoLLM's split of a decoder-only LM at layer k: the edge runs the embeddings, layers [0, k) and exit heads at or
below k; the cloud runs layers [k, n) and the model's own final step (final norm, LM head, soft-cap).

Both halves stand on the core: the model's own forward builds each step's layer arguments (`runner.capture_stack`),
`StackCall.run` runs the layers, `decoding` gives the inputs of a cached step and the final step, `kv.stack_rows`
puts several sessions' caches side by side so the cloud runs one forward for many sessions.

- `EdgeState`: one sequence on the edge (batch 1), its own KV cache of layers [0, k). Every position runs all k edge
  layers (so the layer-k state the cloud receives is exact); after each exit layer the token criterion may decide the
  token on the edge. `standalone_token` is the deepest edge exit's argmax, for standalone mode and the fallback.
- `cloud_forward`: layers [first, n) for new positions of several sessions in one batched forward, from uploaded
  layer-k states (first = k) or from token ids (first = 0, the cloud-only baseline), against each session's cache;
  returns the new cache entries and the next token of the sessions that asked for one. A lone session's cache is
  run as it is (`kv.row_cache`: views, grown by the model's own cache update, the step's only copy of the history);
  several sessions' are stacked side by side, right-padded.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from depthprune import decoding
from depthprune.errors import DepthpruneError
from depthprune.exits.lm_heads import ExitHeadsLike
from depthprune.exits.token_criteria import TokenCriterion, TokenState
from depthprune.kv import decoder_cache, row_cache, stack_rows
from depthprune.runner import capture_stack


class SplitError(DepthpruneError, ValueError):
    """A split point or exit layout does not fit the model."""


def check_split(model: nn.Module, split: int, heads: ExitHeadsLike | None = None) -> int:
    """The number of decoder layers; raise SplitError unless 1 <= split < n and every exit reads a layer below split."""
    _, layers, _ = decoding.decoder_parts(model, "cloud-edge split inference")
    n = len(layers)
    if not 1 <= split < n:
        raise SplitError(
            f"the split must lie in 1..{n - 1} for this {n}-layer decoder (edge: layers [0, k)); got {split}"
        )
    if heads is not None:
        if heads.num_layers != n:
            raise SplitError(f"the exit heads were built for {heads.num_layers} layers, the model has {n}")
        bad = [e for e in heads.layers if e >= split]
        if bad:
            raise SplitError(
                f"exit layers {bad} read layers the edge does not run (it runs 0..{split - 1}); train exits at or "
                f"below layer {split - 1} or choose a larger --split"
            )
    return n


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's attention layers."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(heads), int(head_dim)


@dataclasses.dataclass
class EdgeStep:
    """What one edge step gives: the layer-k states of the new positions [m, hidden]; the token the criterion decided
    on the edge (None: ask the cloud) and the exit it came from; the deepest edge exit's argmax (standalone)."""

    states: torch.Tensor
    token: int | None
    exit_layer: int | None
    standalone_token: int | None


class EdgeState:
    """One sequence on the edge: layers [0, split) with their own KV cache, exits and a token criterion."""

    def __init__(
        self,
        model: nn.Module,
        split: int,
        heads: ExitHeadsLike | None = None,
        criterion: TokenCriterion | None = None,
    ) -> None:
        self.num_layers = check_split(model, split, heads)
        self.model, self.split, self.heads, self.criterion = model, split, heads, criterion
        self.adapter = decoding.decoder_parts(model, "cloud-edge split inference").adapter
        self.exits = sorted(int(e) for e in heads.layers) if heads is not None else []
        self.cache = decoder_cache(model, self.num_layers, "cloud-edge split inference")
        self.length = 0

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> EdgeStep:
        """Feed token ids [m] (the prompt, then one token at a time): run layers [0, split) on them and decide the
        next token at the last position where an exit is confident."""
        ids = ids.reshape(1, -1).to(next(self.model.parameters()).device)
        m = ids.shape[1]
        pos = torch.arange(self.length, self.length + m, device=ids.device)[None]
        inputs = decoding.step_inputs(self.model, ids, None, pos, self.cache)
        h, call = capture_stack(self.model, inputs, adapter=self.adapter)  # [1, m, hidden]
        token = exit_layer = standalone = None
        for idx in range(self.split):
            prev, h = h, call.run(h, idx, idx + 1)
            if idx not in self.exits:
                continue
            state = TokenState(
                idx,
                self.num_layers,
                h[:, -1],
                prev[:, -1],
                logits_fn=lambda idx=idx, h=h, heads=self.heads: heads.logits(idx, h[:, -1:])[:, -1],
                confidence_fn=lambda idx=idx, h=h, heads=self.heads: _last(heads.confidence(idx, h[:, -1:])),
            )
            if token is None and self.criterion is not None and bool(self.criterion.decide(state).reshape(-1)[0]):
                token, exit_layer = int(state.logits.argmax(-1)[0]), idx
            if idx == self.exits[-1]:
                standalone = token if token is not None else int(state.logits.argmax(-1)[0])
        self.length += m
        return EdgeStep(h[0], token, exit_layer, standalone)


def _last(conf: torch.Tensor | None) -> torch.Tensor | None:
    return None if conf is None else conf[:, -1]


@dataclasses.dataclass
class CloudItem:
    """One session's share of a cloud forward: its cache of layers [first, n) (per layer (keys, values)
    [kv_heads, length, head_dim]; empty list when it holds nothing), the new positions (layer-`first` states
    [m, hidden] or token ids [m]) and whether it wants the next token after the last of them."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    inputs: torch.Tensor
    want_token: bool


@torch.no_grad()
def cloud_forward(
    model: nn.Module, first: int, items: list[CloudItem]
) -> list[tuple[list[tuple[torch.Tensor, torch.Tensor]], int | None]]:
    """Run layers [first, n) on every item's new positions in one batched forward; per item, its grown cache (the
    old entries followed by the new ones) and its next token (None unless asked). first = 0 embeds token ids."""
    _, layers, final_logits = decoding.decoder_parts(model, "cloud-edge split inference")
    n = len(layers)
    param = next(model.parameters())
    batch = len(items)
    width = max(it.length for it in items)
    new = max(int(it.inputs.shape[0]) for it in items)
    kv_heads, head_dim = kv_shape(model)
    if width == 0:
        cache = decoder_cache(model, n, "cloud-edge split inference")
        hist_mask = torch.zeros((batch, 0), dtype=torch.long)
    elif batch == 1:  # one session: its cache as it is (views), no padding, no stacking
        it = items[0]
        empty = param.new_zeros((kv_heads, it.length, head_dim))
        marker = param.new_zeros((1, it.length, 1))  # layers [0, first): only their length is read (masks)
        cache = row_cache([(marker, marker)] * first + (list(it.kv) if it.kv else [(empty, empty)] * (n - first)))
        hist_mask = torch.ones((1, it.length), dtype=torch.long)
    else:
        rows = []
        for it in items:
            empty = param.new_zeros((kv_heads, it.length, head_dim))
            kv = it.kv if it.kv else [(empty, empty)] * (n - first)
            marker = param.new_zeros((1, it.length, 1))  # layers [0, first): only their length is read (masks)
            rows.append(([(marker, marker)] * first + list(kv), torch.ones(it.length, dtype=torch.long)))
        cache, hist_mask = stack_rows(rows)  # right-padded with masked columns
    new_mask = torch.zeros((batch, new), dtype=torch.long)
    ids = torch.zeros((batch, new), dtype=torch.long)
    pos = torch.zeros((batch, new), dtype=torch.long)
    for r, it in enumerate(items):
        m = int(it.inputs.shape[0])
        new_mask[r, :m] = 1
        pos[r] = torch.arange(it.length, it.length + new)
        if first == 0:
            ids[r, :m] = it.inputs
    mask = torch.cat([hist_mask, new_mask], dim=1).to(param.device)
    inputs = decoding.step_inputs(model, ids.to(param.device), mask, pos.to(param.device), cache)
    hidden, call = capture_stack(model, inputs)  # [batch, new, hidden]
    if first > 0:
        hidden = param.new_zeros((batch, new, hidden.shape[-1]))
        for r, it in enumerate(items):
            hidden[r, : it.inputs.shape[0]] = it.inputs.to(param)
    hidden = call.run(hidden, first, n)
    results = []
    for r, it in enumerate(items):
        m = int(it.inputs.shape[0])
        if batch == 1 and width > 0 and it.kv:  # the cache's own grown tensors: nothing left to copy
            token = int(final_logits(hidden[:, m - 1 : m])[0, -1].argmax(-1)) if it.want_token else None
            grown = [(layer.keys[0, :, : width + m], layer.values[0, :, : width + m]) for layer in cache.layers[first:]]
            results.append((grown, token))
            continue
        grown = []
        for j, layer in enumerate(cache.layers[first:]):
            k_new = layer.keys[r, :, width : width + m]
            v_new = layer.values[r, :, width : width + m]
            if it.kv:
                grown.append((torch.cat([it.kv[j][0], k_new], dim=1), torch.cat([it.kv[j][1], v_new], dim=1)))
            else:
                grown.append((k_new.clone(), v_new.clone()))
        token = int(final_logits(hidden[r : r + 1, m - 1 : m])[0, -1].argmax(-1)) if it.want_token else None
        results.append((grown, token))
    return results


__all__ = ["CloudItem", "EdgeState", "EdgeStep", "SplitError", "check_split", "cloud_forward", "kv_shape"]
