"""The teacher-forced routed pass: every layer is computed for every position, and the routers' decisions choose,
per token (or sample), between the layer's output and its input (a skipped layer passes its input on).

This is what training and teacher-forced evaluation need (a whole sequence at once, gradients through the gates). It
computes exactly what `depthprune.skipping.inference` computes with real skipping: a skipped token's keys/values at a
layer come from its state entering that layer in both (here because the layer runs on every position; there by the
KV strategy), so the later tokens attend to the same entries.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from depthprune.adapters.registry import get_adapter
from depthprune.runner import capture_stack
from depthprune.skipping.routers import check_threshold, sink_positions
from depthprune.sublayers import part_shares

Gate = Callable[[Any, torch.Tensor], torch.Tensor]  # (layer or (layer, part), router logits) -> gate in [0, 1]


@dataclasses.dataclass
class RoutedPass:
    """logits: the model's own head on the routed final states ([batch, seq, vocab] for decoders, [batch, labels]
    for encoders); probs / gates: per routed layer (per (layer, part) for sub-layer routers), P(runs) and the gate
    used ([batch, seq] or [batch]); executed: layers run per token ([batch, seq]) or per sample ([batch]), as floats
    (gates may be soft; a sub-layer counts as its share of the layer)."""

    logits: torch.Tensor
    probs: dict[Any, torch.Tensor]
    gates: dict[Any, torch.Tensor]
    executed: torch.Tensor
    num_layers: int
    shares: dict[Any, float] = dataclasses.field(default_factory=dict)  # sub-layer routers: each part's share

    def expected_layers(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean expected executed layers (the gates' probabilities, differentiable), over tokens or samples weighted
        by `weights` (e.g. the padding mask; default all): the unrouted layers plus each routed unit's P(runs) times
        its share of a layer (1 for whole layers)."""
        w = torch.ones_like(self.executed) if weights is None else weights.to(self.executed.dtype)
        fixed = self.num_layers - sum(self.shares.get(k, 1.0) for k in self.probs)
        return fixed + sum(self.shares.get(k, 1.0) * (p * w).sum() / w.sum() for k, p in self.probs.items())


def routed_pass(
    model: nn.Module,
    routers: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    threshold: float | None = None,
    gate: Gate | None = None,
    **extra: Any,
) -> RoutedPass:
    """Run `model` on input_ids [batch, seq] with the routers deciding each routed layer: hard decisions at
    `threshold` (P(runs) >= threshold), or `gate(layer, logits)` (e.g. a straight-through relaxation for training)."""
    if gate is None:
        t = check_threshold(0.5 if threshold is None else threshold)

        def gate(layer: Any, logits: torch.Tensor) -> torch.Tensor:
            return (torch.sigmoid(logits) >= t).float()

    adapter = get_adapter(model)
    stack = adapter.present_stacks(model)[-1]
    inputs: dict[str, Any] = {"input_ids": input_ids, **extra}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    token = routers.granularity == "token"
    if token:
        inputs.setdefault("use_cache", False)
    hidden, call = capture_stack(model, inputs, stack=stack, adapter=adapter)  # [batch, seq, hidden]
    sinks = sink_positions(routers, tuple(input_ids.shape), attention_mask)
    if sinks is not None:
        sinks = sinks.to(hidden.device)
    executed = torch.zeros(hidden.shape[:2] if token else hidden.shape[:1], device=hidden.device)
    probs: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    routed = set(routers.layers)
    parts = getattr(routers, "parts", ())
    shares: dict[Any, float] = {}
    for layer in range(len(call)):
        if layer not in routed:
            hidden, executed = call.run(hidden, layer, layer + 1), executed + 1
            continue
        units = [(None, 1.0)] if not parts else list(part_shares(call.layers[layer]).items())
        for part, share in units:
            key = layer if part is None else (layer, part)
            out = call.run(hidden, layer, layer + 1) if part is None else call.run_part(hidden, layer, part)
            logits = routers.logits(layer, hidden, attention_mask) if part is None else routers.logits(
                layer, hidden, attention_mask, part
            )  # fmt: skip
            g = gate(key, logits)
            if sinks is not None:  # the sink positions run every layer
                g = torch.where(sinks, torch.ones_like(g), g)
            probs[key], gates[key], shares[key] = torch.sigmoid(logits), g, share
            gx = (g[..., None] if token else g[:, None, None]).to(hidden.dtype)  # broadcast over hidden (and seq)
            if g.requires_grad:
                hidden = hidden + gx * (out - hidden)
            else:
                hidden = torch.where(gx > 0.5, out, hidden)
            executed = executed + share * g
    if token:
        logits = adapter.final_logits(model, hidden)
    else:
        from depthprune.exits.families import final_head
        from depthprune.exits.inference import head_forward

        logits = head_forward(final_head(model), None, model, hidden)
    return RoutedPass(logits, probs, gates, executed, len(call), shares)


@torch.no_grad()
def routed_perplexity(
    model: nn.Module,
    routers: nn.Module,
    blocks: torch.Tensor,
    threshold: float,
    *,
    batch_size: int = 8,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Teacher-forced perplexity of token blocks [n, seq] under the routers at `threshold`, the mean executed layers
    per token, and the share of positions whose greedy next token equals the untouched model's: `reference`, default
    `model` with every layer (give the original when `model` is a LoRA-adapted copy trained with the routers)."""
    device = next(model.parameters()).device
    reference = model if reference is None else reference
    nll, count, layers, agree = 0.0, 0, 0.0, 0
    for ids in blocks.split(batch_size):
        ids = ids.to(device)
        out = routed_pass(model, routers, ids, threshold=threshold)
        full = reference(input_ids=ids, use_cache=False).logits
        logits = out.logits[:, :-1].float()
        nll += float(nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
        layers += float(out.executed.sum())
        agree += int((out.logits.argmax(-1) == full.argmax(-1)).sum())
    positions = blocks.numel()
    return {
        "ppl": math.exp(nll / count),
        "mean_layers": layers / positions,
        "agreement": agree / positions,
        "threshold": threshold,
    }


@torch.no_grad()
def mean_depth(model: nn.Module, routers: nn.Module, blocks: torch.Tensor, threshold: float, batch_size: int = 8):
    """Mean executed layers per token of token blocks [n, seq] at `threshold` (teacher forced)."""
    device = next(model.parameters()).device
    total = 0.0
    for ids in blocks.split(batch_size):
        total += float(routed_pass(model, routers, ids.to(device), threshold=threshold).executed.sum())
    return total / blocks.numel()


def threshold_for_depth(
    model: nn.Module, routers: nn.Module, blocks: torch.Tensor, target: float, *, steps: int = 12
) -> float:
    """The threshold whose teacher-forced mean depth on `blocks` is closest to `target` from above (bisection: the
    depth falls as the threshold rises)."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        if mean_depth(model, routers, blocks, mid) >= target:
            low = mid
        else:
            high = mid
    return low


__all__ = ["Gate", "RoutedPass", "mean_depth", "routed_pass", "routed_perplexity", "threshold_for_depth"]
