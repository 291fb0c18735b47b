"""A decoder layer split into its two residual sub-layers, attention then MLP, for routers that skip either alone
(per-sub-layer layer skipping, `depthprune.skipping.routers.token_sublayer`).

A stack whose adapter names the layout (`StackSpec.sublayers`) can run each part with the layer's own modules and the
arguments the model's forward gave the layer (`depthprune.runner.LayerCall`); attention then MLP is bit for bit the
layer's forward (tests/test_sublayers.py):
- "pre_norm" (Llama, Mistral, Qwen2): h + self_attn(input_layernorm(h)), then h + mlp(post_attention_layernorm(h));
- "sandwich" (Gemma 3): h + post_attention_layernorm(self_attn(input_layernorm(h))), then
  h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))).
A token that skips a layer's attention still owes later tokens its key/value entry there: the entry of the state it
enters the layer with, as for a skipped layer (`depthprune.kv.propagate`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUBLAYER_LAYOUTS = ("pre_norm", "sandwich")
PARTS = ("attention", "mlp")


def check_layout(layout: str | None, what: str = "this model") -> str:
    """`layout`, or a ValueError that says which families can be split."""
    if layout is None:
        raise ValueError(
            f"{what} does not split its layers into attention and MLP sub-layers (per-sub-layer routing supports "
            "Llama, Mistral, Qwen2 and Gemma 3 decoders); route whole layers instead (router kind token_linear)"
        )
    if layout not in SUBLAYER_LAYOUTS:
        raise ValueError(f"unknown sub-layer layout {layout!r}; known: {', '.join(SUBLAYER_LAYOUTS)}")
    return layout


def run_part(layout: str, layer: nn.Module, part: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One sub-layer of `layer` on hidden [n, seq, hidden_size], residual included. `kwargs`: the layer's call
    arguments (the attention reads its mask, position embeddings and cache from them; the MLP reads none)."""
    if part == "attention":
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]
        if layout == "sandwich":
            out = layer.post_attention_layernorm(out)
        return hidden + out
    if part == "mlp":
        if layout == "sandwich":
            return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    raise ValueError(f"unknown sub-layer {part!r}; a layer has {', '.join(PARTS)}")


def part_shares(layer: nn.Module) -> dict[str, float]:
    """Each sub-layer's share of the layer's parameters (its share of a decode step's matrix work): how much of a
    layer a token that skips only that part saves, the unit in which routed depth is counted."""
    attn = sum(p.numel() for p in layer.self_attn.parameters())
    mlp = sum(p.numel() for p in layer.mlp.parameters())
    return {"attention": attn / (attn + mlp), "mlp": mlp / (attn + mlp)}


__all__ = ["PARTS", "SUBLAYER_LAYOUTS", "check_layout", "part_shares", "run_part"]
